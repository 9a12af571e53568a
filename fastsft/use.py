"""Using a trained model: `generate`, `chat` and `evaluate` on a run directory or an exported model.

A model reference is one of
- a run directory (RUN_DIR/adapter + recipe.toml): the base model loaded as it was trained (4-bit NF4
  when the recipe says so) with the adapter attached;
- an adapter folder (adapter_config.json): its base model (from adapter_config.json) + the adapter;
- a merged export or any local Hugging Face model folder (config.json).

Prompts go through the tokenizer's chat template; generation stops on the template's end-of-turn
token (see `fastsft.export.end_of_turn_ids`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BackendError, DataError
from .rundir import ADAPTER, RECIPE

EVAL_JSON = "eval.json"

# Role markers that must not appear in an answer: a model that writes them is inventing new turns.
ROLE_MARKERS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|start_header_id\|>|<\|eot_id\|>"
    r"|<start_of_turn>|<end_of_turn>|\[INST\]|\[/INST\]"
    r"|^\s*(user|assistant|system|human|gpt)\s*:",
    re.IGNORECASE | re.MULTILINE,
)


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
    from .backends import compute_dtype

    return compute_dtype("auto")


def load_for_use(model_ref, *, dtype: str | None = None, policy=None) -> Loaded:
    """A run directory, adapter folder or model folder -> `Loaded` (unpacks as `model, tokenizer`).
    `policy` (backends.LoadPolicy; default: no remote code, no pickle) is what loading may do, whatever
    the folder's recipe.toml says."""
    import torch

    from . import export
    from .backends import LoadPolicy

    policy = policy or LoadPolicy()
    trust, pickle = policy.trust_remote_code, policy.allow_pickle

    if isinstance(model_ref, Loaded):
        return model_ref
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

    if (path / ADAPTER / "adapter_config.json").exists():
        run = export.read_run(path, policy=policy)
        four_bit = run.load_in_4bit
        dt = dtype or run.train_dtype
        base = export.load_base(
            run.base_path, dt, load_in_4bit=four_bit, trust_remote_code=trust, allow_pickle=pickle
        )
        model = export.attach_adapter(base, run.adapter, allow_pickle=pickle)
        tok = export.load_tokenizer(run.adapter, run.base_path, trust_remote_code=trust)
        loaded = Loaded(model, tok, "run", path, run_dir=path, recipe=run.recipe)
    elif (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base_path = cfg.get("base_model_name_or_path")
        if not base_path:
            raise BackendError(
                f"{path}/adapter_config.json does not name its base model (base_model_name_or_path)."
            )
        base = export.load_base(base_path, dtype or _default_dtype(), trust_remote_code=trust, allow_pickle=pickle)
        model = export.attach_adapter(base, path, allow_pickle=pickle)
        tok = export.load_tokenizer(path, base_path, trust_remote_code=trust)
        loaded = Loaded(model, tok, "adapter", path)
    elif (path / "config.json").exists():
        from transformers import AutoModelForCausalLM

        policy.check_weights(path)
        kwargs = {"dtype": export.torch_dtype(dtype or _default_dtype()), **policy.from_pretrained_kwargs()}
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot load the model in {path}: {e}") from None
        model.eval()
        tok = export.load_tokenizer(path, trust_remote_code=trust)
        loaded = Loaded(model, tok, "model", path)
    else:
        raise BackendError(
            f"{path} is neither a run directory (no adapter/), an adapter folder (no adapter_config.json) "
            "nor a model folder (no config.json)."
        )
    quantized = getattr(getattr(loaded.model, "config", None), "quantization_config", None) is not None
    if torch.cuda.is_available() and loaded.kind != "model" and not quantized:
        loaded.model.to("cuda")
    loaded.eot = export.end_of_turn_ids(loaded.tokenizer)
    if loaded.tokenizer.pad_token_id is None and loaded.eot:
        loaded.tokenizer.pad_token_id = loaded.eot[-1]
    return loaded


def _as_messages(prompt) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    from .data import _not_text

    problem = _not_text(messages)
    if problem:
        raise DataError(f"the prompt: {problem}.")
    return messages


def generate_ids(
    loaded: Loaded,
    messages,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    tools=None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    streamer=None,
    stopping_criteria=None,
):
    """(new token ids, stopped on an end-of-turn token) for the answer to `messages` (chat messages,
    or the prompt's token ids, generation prompt included), with `tools` (function definitions).

    Sampling (temperature > 0) keeps the `top_p` nucleus and starts from `seed` when given; `stop`
    strings end the generation too (the text still holds them: the caller cuts it); `streamer` (a
    transformers streamer) receives the tokens as they come; `stopping_criteria` (a list of
    transformers StoppingCriteria) can end it early, e.g. when a client goes away."""
    import torch

    from .export import chat_ids

    if messages and isinstance(messages[0], int):
        ids = torch.tensor([list(messages)])
    else:
        ids = chat_ids(loaded.tokenizer, messages, add_generation_prompt=True, tools=tools)
    device = next(loaded.model.parameters()).device
    kwargs = dict(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=loaded.eot or None,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(int(seed))
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=loaded.tokenizer)
    if streamer is not None:
        kwargs["streamer"] = streamer
    if stopping_criteria:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
    with torch.no_grad():
        out = loaded.model.generate(**kwargs)
    new = out[0, ids.shape[1] :].tolist()
    stopped = False
    for i, t in enumerate(new):
        if t in loaded.eot:
            new, stopped = new[:i], True
            break
    return new, stopped


def read_tools(path) -> list[dict] | None:
    """Function definitions for `--tools FILE`: a JSON list (or {"tools": [...]}), checked as a data
    row's `tools` column is."""
    from .data import parse_tools

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
    from . import data as data_mod

    d = recipe.data
    if not d.eval and not (d.val_ratio and d.val_ratio > 0):
        raise DataError(
            "the run has no held-out data: its recipe sets neither [data] eval nor [data] val_ratio. "
            "Pass a file of conversations: fastsft eval RUN --data held_out.jsonl"
        )
    items = data_mod.encode_eval_split(recipe, tokenizer, log=log)
    source = f"[data] eval = {recipe.resolve_path(d.eval)}" if d.eval else (
        f"{d.val_ratio:g} of {recipe.resolve_path(d.train)} (seed {recipe.train.seed})"
    )
    return items, source + ", masked as training masked it"


def _loss_tokens(item: dict, max_length: int):
    """(input_ids (1, T), labels (1, T)) of an encoded example: loss where training had it."""
    import torch

    ids = torch.tensor([item["input_ids"][:max_length]])
    labels = ids.clone()
    labels[torch.tensor([item["mask"][:max_length]]) == 0] = -100
    return ids, labels


def _prompt_of(item: dict):
    """The token ids before the first trained token (the prompt, generation prompt included)."""
    first = next((i for i, m in enumerate(item["mask"]) if m), None)
    return item["input_ids"][:first] if first else None


def _recipe_near(path: Path):
    """The recipe of an export: its own recipe.toml, or that of the run named in its export.json."""
    from . import recipe as recipe_mod
    from .export import EXPORT_JSON

    if (path / RECIPE).exists():
        return recipe_mod.load(path / RECIPE)
    try:
        run_dir = json.loads((path / EXPORT_JSON).read_text(encoding="utf-8")).get("run_dir")
    except (OSError, json.JSONDecodeError):
        return None
    if run_dir and (Path(run_dir) / RECIPE).exists():
        return recipe_mod.load(Path(run_dir) / RECIPE)
    return None


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
    import torch
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    loaded = load_for_use(model_ref, policy=policy)
    tokenizer = loaded.tokenizer
    recipe = loaded.recipe
    if recipe is None and data_file is None:
        recipe = _recipe_near(loaded.path)
    if data_file is not None:  # masked as training masks it: the run's recipe, or every default
        from . import data as data_mod

        if not Path(data_file).exists():
            raise DataError(f"{data_file}: no such data file.")
        shaping = recipe if recipe is not None else data_mod.default_recipe(loaded.path, data_file)
        convs = data_mod.encode_file(shaping, tokenizer, data_file)
        source = f"{data_file}, masked as " + ("the run's training masked it" if recipe is not None else "`fastsft run` masks it")
    elif recipe is not None:
        convs, source = eval_conversations(recipe, tokenizer, log=lambda m: console.print(m, highlight=False))
    else:
        raise DataError(f"{loaded.path} is not a run directory, so it has no eval split: pass --data FILE.")
    if max_length is None:
        max_length = recipe.data.max_length if recipe is not None else 2048

    model = loaded.model
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
    if total_tokens == 0:
        raise DataError(f"{source}: no assistant tokens to score.")
    loss = total_nll / total_tokens
    ppl = math.exp(min(loss, 700.0))

    samples = []
    prompts = [p for p in (_prompt_of(c) for c in convs) if p][: max(0, n_gen)]
    for prompt in prompts:
        new, stopped = generate_ids(loaded, prompt, max_new_tokens=max_new_tokens)
        raw = tokenizer.decode(new, skip_special_tokens=False)
        markers = sorted({m.group(0).strip() for m in ROLE_MARKERS.finditer(raw)})
        samples.append(
            {
                "prompt": tokenizer.decode(prompt),
                "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
                "stopped": stopped,
                "role_markers": markers,
                "complies": stopped and not markers,
            }
        )
    n = len(samples)
    result = {
        "model": str(loaded.path),
        "kind": loaded.kind,
        "data": source,
        "conversations": len(convs),
        "tokens": total_tokens,
        "loss": loss,
        "perplexity": ppl,
        "generated": n,
        "max_new_tokens": max_new_tokens,
        "compliance": (sum(s["complies"] for s in samples) / n) if n else None,
        "stopped_share": (sum(s["stopped"] for s in samples) / n) if n else None,
        "role_marker_free_share": (sum(not s["role_markers"] for s in samples) / n) if n else None,
        "samples": samples,
    }

    table = Table(title=f"fastsft eval: {loaded.path}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("held-out data", source)
    table.add_row("conversations / scored tokens", f"{len(convs)} / {total_tokens}")
    table.add_row("loss (assistant tokens)", f"{loss:.4f}")
    table.add_row("perplexity", f"{ppl:.3f}")
    if n:
        table.add_row(f"template compliance ({n} greedy answers)", f"{result['compliance']:.0%}")
        table.add_row("  ended with end-of-turn", f"{result['stopped_share']:.0%}")
        table.add_row("  free of role markers", f"{result['role_marker_free_share']:.0%}")
    console.print(table)

    target = (
        Path(json_out) if json_out else (loaded.run_dir / EVAL_JSON if loaded.run_dir is not None else None)
    )
    if target is not None:
        _write_json_atomic(target, result)
        result["saved_to"] = str(target)
        console.print(f"saved {target}", highlight=False)
    return result


def _write_json_atomic(path: Path, obj) -> None:
    from . import files

    files.make_dir(path.parent)
    files.write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


__all__ = ["Loaded", "load_for_use", "generate", "chat", "evaluate", "eval_conversations", "ROLE_MARKERS"]
