"""The `fastsft` command line. Parses arguments, calls the modules in order, prints fastsft errors
once, as a paragraph, and exits 2 (a traceback is kept for our own bugs only).

Heavy imports (torch, transformers, trl, unsloth) happen inside the commands: unsloth must be
imported before transformers, trl and peft, and `backends.load_model` sees to that.
"""

from __future__ import annotations

import json
import os
import sys

import click

from .cli_common import handle_errors, make_policy, policy_options

SET_HELP = "Override a recipe key, parsed as a TOML value: --set train.learning_rate=1e-4 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastsft")
def main():
    """fastsft: fine-tune a language model on one GPU from a TOML recipe.

    \b
    Example:
      fastsft run recipes/tiny.toml          # a tiny offline run on the CPU, ~2 minutes
      fastsft run recipes/mistral7b_qlora.toml --set train.max_steps=100
    """
    quiet_libraries()


def entry() -> None:
    """The `fastsft` console script. Commands that run a model flush denormal floats to zero on a
    CPU-only machine (process-wide, so here and not in library code, where it would leak into the
    caller's process)."""
    if len(sys.argv) > 1 and sys.argv[1] in ("run", "generate", "chat", "eval", "export", "serve"):
        from .backends import flush_denormals

        flush_denormals()
    main()


def quiet_libraries() -> None:
    """Library chatter off unless FASTSFT_VERBOSE=1: bitsandbytes' "kernels-community" warning on every
    CPU import, and the progress bars of transformers (loading weights) and datasets (map, save); fastsft
    prints its own progress."""
    import logging

    if os.environ.get("FASTSFT_VERBOSE"):
        return
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this one
    # (environment, not imports: unsloth must be imported before transformers, see backends.load_model)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False), required=False)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option(
    "--output-dir",
    "-o",
    type=click.Path(file_okay=False),
    help="Run directory (default runs/<recipe>-<time>).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the fastsft run in --output-dir (only a run; deleted once the new run has started).",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Continue the run in this directory from its newest complete checkpoint.",
)
@click.option(
    "--launch",
    "nproc",
    type=click.IntRange(min=1),
    help="Run as N data-parallel processes on this machine (DDP through torchrun; N GPUs, or CPU with gloo).",
)
@click.option(
    "--allow-data-change",
    is_flag=True,
    help="With --resume: continue although the training data changed since the run started.",
)
@policy_options
@handle_errors
def run(
    recipe,
    overrides,
    output_dir,
    overwrite,
    resume_dir,
    nproc,
    allow_data_change,
    trust_remote_code,
    allow_pickle,
):
    """Train a LoRA adapter as RECIPE says and write a run directory.

    \b
    The run directory holds recipe.toml (resolved), run.json, metrics.jsonl,
    checkpoints/, adapter/, report.md and loss.png. Ctrl-C writes a checkpoint
    and prints the command that resumes the run.
    \b
    Example:
      fastsft run recipes/tiny.toml --set train.max_steps=20 -o runs/try1
      fastsft run --resume runs/try1
    """
    from . import dist, train
    from . import recipe as recipe_mod

    policy = make_policy(trust_remote_code, allow_pickle)
    wanted = None
    if nproc is None and dist.world_size() == 1:
        # [distributed] num_processes > 1 in the recipe launches the ranks, like --launch N
        if resume_dir:
            wanted = train.resume_recipe(resume_dir, recipe, list(overrides))
        else:
            wanted = recipe_mod.load(recipe, list(overrides)) if recipe else None
        if wanted is not None and wanted.distributed.num_processes > 1:
            nproc = wanted.distributed.num_processes
    if nproc and nproc > 1 and dist.world_size() == 1:
        sys.exit(
            _launch_ranks(
                nproc, recipe, overrides, output_dir, overwrite, resume_dir,
                allow_data_change, trust_remote_code, allow_pickle,
            )
        )  # fmt: skip
    if resume_dir:
        if output_dir or overwrite:
            raise click.UsageError(
                "--resume continues the run in its own folder; drop --output-dir / --overwrite"
            )
        r = train.resume_recipe(resume_dir, recipe, list(overrides))
        try:
            train.run(
                r, output_dir=resume_dir, resume=True, policy=policy, allow_data_change=allow_data_change
            )
        finally:
            dist.teardown()
        return
    if recipe is None:
        raise click.UsageError("give a RECIPE to train, or --resume RUN_DIR to continue a run")
    r = recipe_mod.load(recipe, list(overrides))
    try:
        train.run(r, output_dir=output_dir, overwrite=overwrite, policy=policy)
    finally:
        dist.teardown()


def _launch_ranks(
    nproc,
    recipe,
    overrides,
    output_dir,
    overwrite,
    resume_dir,
    allow_data_change,
    trust_remote_code,
    allow_pickle,
) -> int:
    """Start `nproc` ranks of this command (torchrun) and return their exit status."""
    import subprocess

    from . import dist, train
    from . import recipe as recipe_mod

    # the ranks' recipe records how many they are, so that a resume starts as many again
    overrides = [*overrides, f"distributed.num_processes={nproc}"]
    wanted = None
    if resume_dir:
        wanted = train.resume_recipe(resume_dir, recipe, overrides)
    elif recipe:
        wanted = recipe_mod.load(recipe, overrides)
    if wanted is not None:
        dist.check_distributed(wanted)  # refuse here, not once per rank
    argv = ["run"] + ([recipe] if recipe else [])
    for item in overrides:
        argv += ["--set", item]
    argv += ["--allow-data-change"] if allow_data_change else []
    argv += ["--trust-remote-code"] if trust_remote_code else []
    argv += ["--allow-pickle"] if allow_pickle else []
    if resume_dir:
        argv += ["--resume", resume_dir]
    else:
        # every rank must use one folder: its name is fixed here, not per rank
        from .rundir import default_path

        argv += ["-o", str(output_dir or default_path(recipe or "recipe"))]
        argv += ["--overwrite"] if overwrite else []
    return subprocess.call(dist.launch_command(nproc, argv))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@handle_errors
def validate(recipe, overrides):
    """Check RECIPE and print it resolved (defaults filled in, overrides applied).

    Exits 0 when valid; otherwise lists every problem at once and exits 2.

    \b
    Example:
      fastsft validate recipes/mistral7b_qlora.toml --set train.learning_rate=1e-4
    """
    from . import recipe as recipe_mod
    from .errors import RecipeError
    from .preflight import problems

    r = recipe_mod.load(recipe, list(overrides))
    found = problems(r)
    if found:
        raise RecipeError(found, path=str(recipe))
    click.echo(f"# {recipe}: valid\n")
    click.echo(r.to_toml())


@main.command()
@handle_errors
def schema():
    """Print the recipe schema as JSON Schema, for TOML editors.

    \b
    Example (taplo / Even Better TOML):
      fastsft schema > fastsft-recipe.schema.json
      # then, first line of a recipe:  #:schema ./fastsft-recipe.schema.json
    """
    from . import recipe as recipe_mod

    click.echo(json.dumps(recipe_mod.json_schema(), indent=2))


@main.command()
@handle_errors
def doctor():
    """Versions, their tested bounds, the GPU, and which backend `auto` would pick.

    \b
    Example:
      fastsft doctor
    """
    from . import doctor as doctor_mod

    ok = doctor_mod.report()
    sys.exit(0 if ok else 1)


@main.group()
def data():
    """Look at the training data as the trainer will see it."""


@data.command("preview")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option("-n", "n", default=3, show_default=True, help="Examples to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per example on stdout, nothing else.")
@policy_options
@handle_errors
def preview(recipe, overrides, n, as_json, trust_remote_code, allow_pickle):
    """Render the first N training examples with the tokens that carry loss highlighted, then stats.

    \b
    Example:
      fastsft data preview recipes/tiny.toml -n 2
      fastsft data preview recipes/tiny.toml --json | jq .trained_text
    """
    from rich.console import Console

    from . import backends
    from . import data as data_mod
    from . import recipe as recipe_mod

    r = recipe_mod.load(recipe, list(overrides))
    tokenizer = backends.load_tokenizer(r, policy=make_policy(trust_remote_code, allow_pickle))
    data_mod.preview(r, tokenizer, n=n, as_json=as_json, console=Console(stderr=as_json))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option(
    "--gpu-memory", default="24GiB", show_default=True, help="The GPU's memory (24GiB, 80GB: GB read as GiB)."
)
@click.option("--max-length", "find_max", is_flag=True, help="Also find the longest max_length that fits.")
@click.option(
    "--baseline",
    type=click.Choice(["hf"]),
    default=None,
    help="Plan the stock setup of Unsloth's table instead (transformers + PEFT + bitsandbytes QLoRA).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, nothing else.")
@handle_errors
def plan(recipe, overrides, gpu_memory, find_max, baseline, as_json):
    """Simulate one training step of RECIPE on the CPU and print its peak GPU memory and its parts.

    \b
    Example:
      fastsft plan recipes/llama3_8b_qlora.toml --gpu-memory 24GiB --max-length
    """
    from . import plan as plan_mod
    from . import recipe as recipe_mod
    from .errors import RecipeError

    r = recipe_mod.load(recipe, list(overrides))
    try:
        budget = plan_mod.parse_size(gpu_memory)
    except ValueError as e:
        raise RecipeError(f"--gpu-memory: {e}") from None
    setup = plan_mod.setup_from_recipe(r, baseline=baseline)
    out = plan_mod.plan(setup, r.data.max_length, budget, find_max=find_max)
    out["recipe"] = str(recipe)
    out["simulation"] = "meta tensors on the CPU; transformers backend; FlashAttention-2 memory"
    if as_json:
        click.echo(json.dumps(out))
        return
    gib = plan_mod.GiB
    click.echo(
        f"{recipe}: one step at max_length {out['seq_len']}, batch {out['batch_size']} (simulated"
        f"{', baseline ' + baseline if baseline else ''})"
    )
    for k, v in out["parts"].items():
        click.echo(f"  {k:<40} {v / gib:8.2f} GiB")
    verdict = "fits" if out["fits"] else "does NOT fit"
    click.echo(
        f"  {'peak (reserved)':<40} {out['peak_bytes'] / gib:8.2f} GiB  ({verdict} in {budget / gib:.1f} GiB)"
    )
    if not out["fits"]:
        fix = out.get("levers_that_fit")
        if fix:
            keys = " ".join(f"--set train.{plan_mod.LEVER_KEYS[k]}={json.dumps(v)}" for k, v in fix.items())
            click.echo(f"  it fits with the levers: {keys}")
        else:
            click.echo("  even every lever does not make it fit: lower data.max_length or the batch size")
    if find_max:
        click.echo(f"  longest max_length that fits: {out['max_length']:,}")


from .cli_use import register as _register_use  # noqa: E402  (export, generate, chat, eval)

_register_use(main)


if __name__ == "__main__":  # pragma: no cover
    main()
