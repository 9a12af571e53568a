"""Using a trained model: `generate`, `chat` and `evaluate` on a run directory or an exported model.

A model reference is one of
- a run directory (RUN_DIR/adapter + recipe.toml): the base model loaded as it was trained (4-bit NF4
  when the recipe says so) with the adapter attached; or, for a full fine-tune, its RUN_DIR/model;
- an adapter folder (adapter_config.json): its base model (from adapter_config.json) + the adapter;
- a merged export or any local Hugging Face model folder (config.json).

Models load through the backend's loader (`fastsft.backends.transformers.load_trained`: the base as
trained, its embeddings grown to the run's tokenizer, the adapter attached); prompts go through the
tokenizer's chat template and answers come from `fastsft.chat.generation`, stopping on the template's
end-of-turn token (`fastsft.chat.templates.end_of_turn_ids`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastsft.errors import BackendError, DataError
from fastsft.rundir import ADAPTER, MODEL, RECIPE

EVAL_JSON = "eval.json"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    kind: str  # "run" | "adapter" | "model"
    path: Path
    run_dir: Path | None = None
    recipe: object | None = None
    eot: list[int] = field(default_factory=list)

    def __iter__(self):  # model, tokenizer = load_for_use(...)
        return iter((self.model, self.tokenizer))


def _default_dtype() -> str:
    from fastsft.backends import compute_dtype

    return compute_dtype("auto")


def _check_ref(model_ref) -> Path:
    """The folder `model_ref` names, or a BackendError saying what to pass instead."""
    path = Path(model_ref)
    if not path.exists():
        raise BackendError(
            f"{path}: no such folder. Pass a run directory (runs/<name>), an export (RUN_DIR/export-merged) "
            "or a local model folder."
        )
    if path.suffix == ".gguf" or (
        path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists()
    ):
        raise BackendError(
            f"{path} is a GGUF export: run it with llama.cpp (llama-cli -m FILE.gguf), not fastsft."
        )
    if path.is_file():
        raise BackendError(f"{path} is a file; pass a run directory or a model folder.")
    return path


def _load_run(path: Path, dtype: str | None, policy) -> Loaded:
    """A run directory: the base as the run trained it (4-bit NF4 when the recipe says so) + its adapter."""
    from fastsft.export import read_run

    run = read_run(path, policy=policy)
    tok = run.tokenizer()
    model = run.load(dtype or run.train_dtype, load_in_4bit=run.load_in_4bit, tokenizer=tok)
    return Loaded(model, tok, "run", path, run_dir=path, recipe=run.recipe)


def _load_adapter(path: Path, dtype: str | None, policy) -> Loaded:
    """An adapter folder: the base named in its adapter_config.json + the adapter."""
    from fastsft.backends.common import load_tokenizer
    from fastsft.backends.transformers import load_trained

    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise BackendError(
            f"{path}/adapter_config.json does not name its base model (base_model_name_or_path)."
        )
    tok = load_tokenizer(path, base_path, policy=policy)
    model = load_trained(base_path, path, dtype or _default_dtype(), tokenizer=tok, policy=policy)
    return Loaded(model, tok, "adapter", path)


def _load_model(path: Path, dtype: str | None, policy) -> Loaded:
    """A merged export or any local Hugging Face model folder, on the GPU when there is one."""
    from fastsft.backends.common import load_tokenizer
    from fastsft.backends.transformers import load_base

    model = load_base(str(path), dtype or _default_dtype(), policy=policy, on_gpu=True, what="the model")
    return Loaded(model, load_tokenizer(path, policy=policy), "model", path)


def load_for_use(model_ref, *, dtype: str | None = None, policy=None) -> Loaded:
    """A run directory, adapter folder or model folder -> `Loaded` (unpacks as `model, tokenizer`).
    `policy` (backends.LoadPolicy; default: no remote code, no pickle) is what loading may do, whatever
    the folder's recipe.toml says."""
    import torch

    from fastsft.backends import LoadPolicy
    from fastsft.chat.templates import end_of_turn_ids

    if isinstance(model_ref, Loaded):
        return model_ref
    policy = policy or LoadPolicy()
    path = _check_ref(model_ref)
    if (path / ADAPTER / "adapter_config.json").exists() or (path / MODEL / "config.json").exists():
        loaded = _load_run(path, dtype, policy)  # a LoRA run, or a full fine-tune's (model/, no adapter)
    elif (path / "adapter_config.json").exists():
        loaded = _load_adapter(path, dtype, policy)
    elif (path / "config.json").exists():
        loaded = _load_model(path, dtype, policy)
    else:
        raise BackendError(
            f"{path} is neither a run directory (no adapter/ or model/), an adapter folder (no adapter_config.json) "
            "nor a model folder (no config.json)."
        )
    quantized = getattr(getattr(loaded.model, "config", None), "quantization_config", None) is not None
    if torch.cuda.is_available() and loaded.kind != "model" and not quantized:
        loaded.model.to("cuda")
    loaded.eot = end_of_turn_ids(loaded.tokenizer)
    if loaded.tokenizer.pad_token_id is None and loaded.eot:
        loaded.tokenizer.pad_token_id = loaded.eot[-1]
    return loaded


def _as_messages(prompt) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    from fastsft.data import not_text

    problem = not_text(messages)
    if problem:
        raise DataError(f"the prompt: {problem}.")
    return messages


def generate_ids(loaded: Loaded, messages, **kwargs) -> tuple[list[int], bool]:
    """`fastsft.chat.generation.generate_ids` with the loaded model, its tokenizer and end-of-turn ids:
    (new token ids, stopped on an end-of-turn token)."""
    from fastsft.chat.generation import generate_ids as generate

    return generate(loaded.model, loaded.tokenizer, messages, eot=loaded.eot, **kwargs)


def read_tools(path) -> list[dict] | None:
    """Function definitions for `--tools FILE`: a JSON list (or {"tools": [...]}), checked as a data
    row's `tools` column is."""
    from fastsft.data import parse_tools

    if path is None:
        return None
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--tools {path}: no such file.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--tools {path}: not a JSON file ({e}).") from None
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    tools = parse_tools(value, f"--tools {path}")
    if not tools:
        raise DataError(f"--tools {path}: the list of tools is empty.")
    return tools


def generate(
    model_ref, prompt, max_new_tokens: int = 128, temperature: float = 0.0, tools=None, *, policy=None
) -> str:
    """The model's answer to `prompt` (a string, or a list of chat messages) through the chat template,
    with `tools` (function definitions) when given."""
    if max_new_tokens < 1:
        raise BackendError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if temperature < 0:
        raise BackendError(f"--temperature must be 0 (greedy) or more, got {temperature}.")
    loaded = load_for_use(model_ref, policy=policy)
    new, _ = generate_ids(
        loaded, _as_messages(prompt), max_new_tokens=max_new_tokens, temperature=temperature, tools=tools
    )
    return loaded.tokenizer.decode(new, skip_special_tokens=True).strip()


def chat(
    model_ref,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    system: str | None = None,
    tools=None,
    input=None,
    console=None,
    policy=None,
) -> list[dict]:
    """Talk to the model: each line read is a user turn, the conversation is kept. `/exit` (or end of
    input) quits, `/reset` starts over. Returns the conversation."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    stream = input or sys.stdin
    loaded = load_for_use(model_ref, policy=policy)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    console.print(
        f"[bold]fastsft chat[/] with {loaded.path} ({loaded.kind}). /exit quits, /reset starts over."
    )
    while True:
        console.print("[bold cyan]you>[/] ", end="")
        line = stream.readline()
        if not line:
            console.print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            console.print("[dim](conversation cleared)[/]")
            continue
        try:
            _as_messages(text)
        except DataError as e:
            console.print(f"[yellow]{escape(str(e))}[/]")
            continue
        messages.append({"role": "user", "content": text})
        new, stopped = generate_ids(
            loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, tools=tools
        )
        answer = loaded.tokenizer.decode(new, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        console.print("[bold green]model>[/] " + escape(answer), highlight=False)
        if not stopped:
            console.print(
                f"[yellow](the answer hit the {max_new_tokens}-token limit without ending its turn)[/]"
            )
    return messages


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def eval_conversations(recipe, tokenizer, *, log=None) -> tuple[list[dict], str]:
    """The run's held-out examples ([data] eval, or the val_ratio split with the run's seed),
    tokenized and masked by training's own code (`fastsft.data.encode_eval_split`):
    [{"input_ids", "mask"}], and where they came from."""
    from fastsft import data as data_mod

    d = recipe.data
    if not d.eval and not (d.val_ratio and d.val_ratio > 0):
        raise DataError(
            "the run has no held-out data: its recipe sets neither [data] eval nor [data] val_ratio. "
            "Pass a file of conversations: fastsft eval RUN --data held_out.jsonl"
        )
    items = data_mod.encode_eval_split(recipe, tokenizer, log=log)
    source = (
        f"[data] eval = {recipe.resolve_path(d.eval)}"
        if d.eval
        else (f"{d.val_ratio:g} of {recipe.resolve_path(d.train)} (seed {recipe.train.seed})")
    )
    return items, source + ", masked as training masked it"


def _loss_tokens(item: dict, max_length: int):
    """(input_ids (1, T), labels (1, T)) of an encoded example: loss where training had it."""
    import torch

    from fastsft.data import labels

    return torch.tensor([item["input_ids"][:max_length]]), torch.tensor(
        [labels(item["input_ids"], item["mask"], max_length)]
    )


def _prompt_of(item: dict):
    """The token ids before the first trained token (the prompt, generation prompt included)."""
    first = next((i for i, m in enumerate(item["mask"]) if m), None)
    return item["input_ids"][:first] if first else None


def _recipe_near(path: Path):
    """The recipe of an export: its own recipe.toml, or that of the run named in its export.json."""
    from fastsft import recipe as recipe_mod
    from fastsft.export import EXPORT_JSON

    if (path / RECIPE).exists():
        return recipe_mod.load(path / RECIPE)
    try:
        run_dir = json.loads((path / EXPORT_JSON).read_text(encoding="utf-8")).get("run_dir")
    except (OSError, json.JSONDecodeError):
        return None
    if run_dir and (Path(run_dir) / RECIPE).exists():
        return recipe_mod.load(Path(run_dir) / RECIPE)
    return None


def _held_out(loaded: Loaded, data_file, console) -> tuple[list[dict], str, object | None]:
    """(encoded conversations, where they came from, the recipe that shaped them) to evaluate on:
    `data_file` masked as the run trained (or as `fastsft run` masks by default), else the run's split."""
    recipe = loaded.recipe
    if recipe is None and data_file is None:
        recipe = _recipe_near(loaded.path)
    if data_file is not None:  # masked as training masks it: the run's recipe, or every default
        from fastsft import data as data_mod

        if not Path(data_file).exists():
            raise DataError(f"{data_file}: no such data file.")
        shaping = recipe if recipe is not None else data_mod.default_recipe(loaded.path, data_file)
        convs = data_mod.encode_file(shaping, loaded.tokenizer, data_file)
        how = "the run's training masked it" if recipe is not None else "`fastsft run` masks it"
        return convs, f"{data_file}, masked as {how}", recipe
    if recipe is not None:
        convs, source = eval_conversations(
            recipe, loaded.tokenizer, log=lambda m: console.print(m, highlight=False)
        )
        return convs, source, recipe
    raise DataError(f"{loaded.path} is not a run directory, so it has no eval split: pass --data FILE.")


def held_out_loss(model, convs: list[dict], max_length: int) -> tuple[float, int]:
    """(mean cross-entropy over the tokens training trained, their count) of encoded conversations."""
    import torch

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            ids, labels = _loss_tokens(conv, max_length)
            if (labels[:, 1:] != -100).sum() == 0:
                continue
            logits = model(input_ids=ids.to(device)).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[0, 1:].to(device), ignore_index=-100, reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += int((labels[0, 1:] != -100).sum())
    return (total_nll / total_tokens if total_tokens else float("nan")), total_tokens


def _compliance_samples(loaded: Loaded, convs: list[dict], n_gen: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers (fastsft.chat.generation.answer) to the prompts of the first `n_gen` conversations."""
    from fastsft.chat.generation import answer

    tokenizer = loaded.tokenizer
    samples = []
    prompts = [p for p in (_prompt_of(c) for c in convs) if p][: max(0, n_gen)]
    for prompt in prompts:
        got = answer(loaded.model, tokenizer, prompt, eot=loaded.eot, max_new_tokens=max_new_tokens)
        samples.append(
            {
                "prompt": tokenizer.decode(prompt),
                "answer": got.text,
                "stopped": got.stopped,
                "role_markers": got.role_markers,
                "complies": got.complies,
            }
        )
    return samples


def _print_eval(console, result: dict) -> None:
    from rich.table import Table

    n = result["generated"]
    table = Table(title=f"fastsft eval: {result['model']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("held-out data", result["data"])
    table.add_row("conversations / scored tokens", f"{result['conversations']} / {result['tokens']}")
    table.add_row("loss (assistant tokens)", f"{result['loss']:.4f}")
    table.add_row("perplexity", f"{result['perplexity']:.3f}")
    if n:
        table.add_row(f"template compliance ({n} greedy answers)", f"{result['compliance']:.0%}")
        table.add_row("  ended with end-of-turn", f"{result['stopped_share']:.0%}")
        table.add_row("  free of role markers", f"{result['role_marker_free_share']:.0%}")
    console.print(table)


def evaluate(
    model_ref,
    data_file=None,
    n_gen: int = 16,
    *,
    max_new_tokens: int = 64,
    json_out=None,
    max_length: int | None = None,
    console=None,
    policy=None,
) -> dict:
    """Held-out loss and perplexity (assistant tokens), and template compliance of greedy answers.

    Compliance is the share of answers to held-out prompts that end with the end-of-turn token within
    `max_new_tokens` and hold no role markers. The results are printed as a table and saved as JSON:
    `json_out`, else RUN_DIR/eval.json for a run directory."""
    from rich.console import Console

    console = console or Console()
    loaded = load_for_use(model_ref, policy=policy)
    convs, source, recipe = _held_out(loaded, data_file, console)
    if max_length is None:
        max_length = recipe.data.max_length if recipe is not None else 2048
    loss, tokens = held_out_loss(loaded.model, convs, max_length)
    if tokens == 0:
        raise DataError(f"{source}: no assistant tokens to score.")
    samples = _compliance_samples(loaded, convs, n_gen, max_new_tokens)
    n = len(samples)
    result = {
        "model": str(loaded.path),
        "kind": loaded.kind,
        "data": source,
        "conversations": len(convs),
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "generated": n,
        "max_new_tokens": max_new_tokens,
        "compliance": (sum(s["complies"] for s in samples) / n) if n else None,
        "stopped_share": (sum(s["stopped"] for s in samples) / n) if n else None,
        "role_marker_free_share": (sum(not s["role_markers"] for s in samples) / n) if n else None,
        "samples": samples,
    }
    _print_eval(console, result)
    target = (
        Path(json_out) if json_out else (loaded.run_dir / EVAL_JSON if loaded.run_dir is not None else None)
    )
    if target is not None:
        _write_json_atomic(target, result)
        result["saved_to"] = str(target)
        console.print(f"saved {target}", highlight=False)
    return result


def _write_json_atomic(path: Path, obj) -> None:
    from fastsft import files

    files.make_dir(path.parent)
    files.write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


__all__ = ["Loaded", "load_for_use", "generate", "chat", "evaluate", "eval_conversations"]
