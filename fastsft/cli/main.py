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

from fastsft import backends, dist, threads
from fastsft import data as data_mod
from fastsft import recipe as recipe_mod
from fastsft.backends import flush_denormals
from fastsft.cli import doctor as doctor_mod
from fastsft.cli.common import handle_errors, make_policy, policy_options
from fastsft.dist import Hosts
from fastsft.errors import RecipeError
from fastsft.run import train
from fastsft.run.preflight import problems
from fastsft.run.resume import resume_recipe
from fastsft.rundir import default_path

SET_HELP = "Override a recipe key, parsed as a TOML value: --set train.learning_rate=1e-4 (repeatable)."


class _Group(click.Group):
    """The command group, keeping the arguments it was invoked with (`ctx.meta["argv"]`): `run --launch N`
    starts its ranks with the same command line, less `--launch`."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["argv"] = argv
        return ctx


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastsft")
def main():
    """fastsft: fine-tune a language model on one GPU from a TOML recipe.

    \b
    Example:
      fastsft run recipes/tiny.toml          # a tiny offline run on the CPU
      fastsft run recipes/mistral7b_qlora.toml --set train.max_steps=100
    """
    quiet_libraries()


def entry() -> None:
    """The `fastsft` console script. First, before anything imports torch, OpenMP's threads are told to
    sleep rather than spin while they wait for a core (`fastsft.threads`: a busy machine's other work
    stalled the whole step ~8x; the user's own OMP_WAIT_POLICY wins). Commands that run a model flush
    denormal floats to zero on a CPU-only machine. Both are process-wide, so here and not in library
    code, where they would leak into the caller's process."""
    threads.apply()
    if len(sys.argv) > 1 and sys.argv[1] in ("run", "generate", "chat", "eval", "export", "serve"):
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
    # The hub's bars (which transformers' loading bars follow) are turned off by its function, not by
    # HF_HUB_DISABLE_PROGRESS_BARS: the variable has priority, so the libraries' own "turn them back on"
    # (transformers' suppress_progress_bars, Unsloth's loader) warned "Cannot enable progress bars". A
    # user's own HF_HUB_DISABLE_PROGRESS_BARS is left as it is. (huggingface_hub, not transformers:
    # unsloth must be imported before transformers, see backends.load_model.)
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


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
    help="Run as N processes on this machine through torchrun, with [distributed] strategy (ddp, fsdp or "
    "deepspeed-zero3; N GPUs, or CPU processes over gloo).",
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Several hosts: how many (run the same command on each, with its --node-rank). The run directory "
    "(-o) must be a folder every host shares: each rank writes its part of each checkpoint there.",
)
@click.option(
    "--node-rank",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Several hosts: this host's number, 0 to nnodes-1 (host 0 writes the run directory).",
)
@click.option("--master-addr", help="Several hosts: the address of host 0, which every host can reach.")
@click.option("--master-port", type=click.IntRange(1, 65535), help="Several hosts: a free port on host 0.")
@click.option(
    "--rdzv-endpoint",
    metavar="HOST:PORT",
    help="Several hosts: a torchrun rendezvous endpoint, instead of --master-addr/--node-rank.",
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
    nnodes,
    node_rank,
    master_addr,
    master_port,
    rdzv_endpoint,
    allow_data_change,
    trust_remote_code,
    allow_pickle,
):
    """Fine-tune the model as RECIPE says (a LoRA adapter, or every weight) and write a run directory.

    \b
    The run directory holds recipe.toml (resolved), run.json, metrics.jsonl,
    checkpoints/, adapter/, report.md and loss.png. Ctrl-C writes a checkpoint
    and prints the command that resumes the run.
    \b
    Example:
      fastsft run recipes/tiny.toml --set train.max_steps=20 -o runs/try1
      fastsft run --resume runs/try1
    \b
    Several hosts (the same command on each; -o a folder they all share):
      fastsft run r.toml --launch 8 --nnodes 2 --node-rank 0 \\
        --master-addr 10.0.0.1 --master-port 29500 -o /shared/runs/r
    """
    if resume_dir and (output_dir or overwrite):
        raise click.UsageError(
            "--resume continues the run in its own folder; drop --output-dir / --overwrite"
        )
    if not resume_dir and recipe is None:
        raise click.UsageError("give a RECIPE to train, or --resume RUN_DIR to continue a run")
    # the recipe is read once, here, and handed down
    if resume_dir:
        r = resume_recipe(resume_dir, recipe, list(overrides))
    else:
        r = recipe_mod.load(recipe, list(overrides))
    hosts = check_hosts(nnodes, node_rank, master_addr, master_port, rdzv_endpoint, output_dir or resume_dir)
    if nproc is None and dist.world_size() == 1 and r.distributed.num_processes > 1:
        nproc = r.distributed.num_processes  # like --launch N
    if dist.world_size() == 1 and ((nproc or 1) > 1 or hosts.nnodes > 1):
        dist.check_distributed(r)  # refuse here, not once per rank
        if resume_dir:
            dist.check_resume_files(resume_dir, (nproc or 1) * hosts.nnodes)
        argv = rank_argv(click.get_current_context().meta["argv"], nproc or 1, r, output_dir, resume_dir)
        run_dir = resume_dir or output_dir or argv[argv.index("-o") + 1]  # rank_argv names one
        sys.exit(dist.launch(nproc or 1, argv, hosts, run_dir=run_dir))
    policy = make_policy(trust_remote_code, allow_pickle)
    try:
        if resume_dir:
            train.run(
                r, output_dir=resume_dir, resume=True, policy=policy, allow_data_change=allow_data_change
            )
        else:
            train.run(r, output_dir=output_dir, overwrite=overwrite, policy=policy)
    except RuntimeError as e:  # a rank whose collective lost another rank: a line, not gloo's traceback
        lost = dist.lost_contact(e)
        if lost is None:
            raise
        raise lost from None
    finally:
        dist.teardown()
    dist.leave()  # a rank whose run is done exits here, past C++'s exit-time destructors


def check_hosts(nnodes, node_rank, master_addr, master_port, rdzv_endpoint, run_dir):
    """torchrun's multi-node arguments, or a usage error that says what is missing."""
    if nnodes <= 1:
        if node_rank or master_addr or master_port or rdzv_endpoint:
            raise click.UsageError(
                "--node-rank / --master-addr / --master-port / --rdzv-endpoint need --nnodes 2 or more"
            )
        return Hosts()
    if node_rank >= nnodes:
        raise click.UsageError(
            f"--node-rank {node_rank}: the hosts are numbered 0 to {nnodes - 1} (--nnodes {nnodes})"
        )
    if not (master_addr or rdzv_endpoint):
        raise click.UsageError("--nnodes: give --master-addr (host 0's address) or --rdzv-endpoint HOST:PORT")
    if run_dir is None:
        raise click.UsageError(
            "--nnodes: give the run directory with -o, the same path on every host, in a folder they all share "
            "(NFS or a cluster filesystem): each rank writes its part of every checkpoint there, and a resume "
            "needs all of them"
        )
    return Hosts(nnodes, node_rank, master_addr, master_port, rdzv_endpoint)


def rank_argv(argv: list[str], nproc: int, recipe, output_dir, resume_dir) -> list[str]:
    """The command line of each of `nproc` ranks: this one without `--launch`, the rank count recorded in
    the recipe (a resume starts as many again), and, for a new run, one run directory named here for
    every rank."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--launch":
            skip = True
        elif not arg.startswith("--launch="):
            out.append(arg)
    out += ["--set", f"distributed.num_processes={nproc}"]
    if not resume_dir and not output_dir:
        out += ["-o", str(default_path(recipe.path or "recipe"))]
    return out


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
    click.echo(json.dumps(recipe_mod.json_schema(), indent=2))


@main.command()
@handle_errors
def doctor():
    """Versions, their tested bounds, the GPU, and which backend `auto` would pick.

    \b
    Example:
      fastsft doctor
    """
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
    from fastsft import plan as plan_mod

    r = recipe_mod.load(recipe, list(overrides))
    try:
        budget = plan_mod.parse_size(gpu_memory)
    except ValueError as e:
        raise RecipeError(f"--gpu-memory: {e}") from None
    setup = plan_mod.setup_from_recipe(r, baseline=baseline)
    fit = "off" if baseline else r.train.fit  # (the baseline is the stock setup, fitted by nothing)
    accumulation = r.train.gradient_accumulation_steps
    with plan_mod.fit_mod.reporting(lambda line: click.echo(line, err=True)):  # progress: stderr
        out = plan_mod.plan(
            setup, r.data.max_length, budget, find_max=find_max, fit=fit, accumulation=accumulation
        )
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
    if out.get("lever_savings"):
        click.echo("  what each lever saves (cumulatively, in fit's order):")
        for row in out["lever_savings"][1:]:
            click.echo(
                f"    {row['set']:<44} -{row['saves_bytes'] / gib:6.2f} GiB -> {row['peak_bytes'] / gib:6.2f} GiB"
            )
    f = out.get("fit")
    if f is not None:
        click.echo(f'  fit = "auto" in {budget / gib:.1f} GiB: ' + plan_mod.fit_mod.summary(f))
    elif not out["fits"]:
        click.echo(f"  {plan_mod.lever_advice(out)}")
    if find_max:
        memory = out["max_length_memory"]
        bound = (
            f" (the model's context, max_position_embeddings, is the limit: memory alone would fit "
            f"{memory:,}{' or more' if memory == plan_mod.MAX_LENGTH else ''})"
            if out["max_length_bound"] == "context"
            else ""
        )
        click.echo(f"  longest max_length that fits ({out['max_length_with']}): {out['max_length']:,}{bound}")


from fastsft.cli.use import register as _register_use  # noqa: E402  (export, generate, chat, eval)

_register_use(main)
