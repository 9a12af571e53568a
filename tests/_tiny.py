"""Constants and helpers shared by the tests (importable as `_tiny` from tests/)."""

import json
from pathlib import Path

from fastsft import data as D
from fastsft import recipe as R
from fastsft.chat.templates import CHATML

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
DEMO = RECIPES / "data" / "demo.jsonl"

# a conversation with a system prompt and two exchanges (the data and chat template tests)
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Colour of a lime?"},
    {"role": "assistant", "content": "A lime is green."},
    {"role": "user", "content": "And a plum?"},
    {"role": "assistant", "content": "A plum is purple."},
]
# the built-in ChatML template without its {% generation %} markers (masks found another way)
CHATML_NO_MARKERS = CHATML.replace("{%- generation -%}\n", "").replace("{%- endgeneration -%}\n", "")
# what CONV trains with the ChatML template: the answers and their end-of-turn tokens
TRAINED = "A lime is green.<|im_end|>A plum is purple.<|im_end|>"


# ----------------------------------------------------------------------------------------------
# data rows and the recipes that read them (the tests of fastsft.data and fastsft.chat)
# ----------------------------------------------------------------------------------------------


def qa(i: int) -> dict:
    """A one-exchange conversation row, numbered."""
    return {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }


def write_jsonl(path, rows):
    """Rows (dicts, or strings written as they are: a bad line) as a JSONL file."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def make_recipe(tmp_path, data_file="train.jsonl", **data):
    """A recipe of the tiny model with only a [data] section: `data_file` and the keys given, written to
    tmp_path/recipe.toml and loaded."""
    lines = ["[model]", 'name = "builtin:tiny-mistral"', "[data]", f"train = {json.dumps(str(data_file))}"]
    for k, v in data.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, str):
            v = json.dumps(v)
        elif isinstance(v, dict):
            v = "{ " + ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items()) + " }"
        lines.append(f"{k} = {v}")
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return R.load(path)


def quiet(msg):
    pass


def prepare(recipe, tok, log=quiet):
    """fastsft.data.prepare_data, silent."""
    return D.prepare_data(recipe, tok, log=log)


def trained_texts(recipe, tok, n=5):
    """The trained text of the first `n` rows, as `fastsft data preview` shows it."""
    rows, _ = D.preview_rows(recipe, tok, n)
    return [r["trained_text"] for r in rows]


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load_tiny(tmp_path: Path, *overrides: str):
    """TINY_RECIPE written to tmp_path/r.toml and loaded with `--set`-style overrides ("train.max_steps=4")."""
    p = tmp_path / "r.toml"
    p.write_text(TINY_RECIPE)
    return R.load(p, list(overrides))


def load_text(tmp_path: Path, text: str, overrides=None):
    """A recipe text written to tmp_path/r.toml and loaded (with `--set`-style overrides)."""
    p = tmp_path / "r.toml"
    p.write_text(text, encoding="utf-8")
    return R.load(p, overrides)


def losses(run_dir: Path) -> list[float]:
    """The training losses of a run, in step order, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assistant_batch(tokenizer, path: Path, n_rows: int) -> dict:
    """The first `n_rows` conversations ({"messages": [...]} lines) of a JSONL file as one right-padded
    batch: input_ids (rows, T), attention_mask, and labels that are the ids on the assistant's tokens (the
    chat template's assistant mask) and IGNORE_INDEX elsewhere, on the CPU."""
    import torch

    from fastsft.data.encode import IGNORE_INDEX

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:n_rows]]
    enc = [
        tokenizer.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True)
        for r in rows
    ]
    T = max(len(e["input_ids"]) for e in enc)
    ids = torch.full((len(enc), T), tokenizer.pad_token_id)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    labels = torch.full((len(enc), T), IGNORE_INDEX)
    for i, e in enumerate(enc):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e["assistant_masks"]) == 1, ids[i, :n], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `folder`: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


TINY_RECIPE = f"""
[model]
name = "builtin:tiny-mistral"
load_in_4bit = false
[lora]
r = 8
lora_alpha = 16
[data]
train = "{DEMO}"
max_length = 96
[train]
learning_rate = 3e-3
max_steps = 6
per_device_train_batch_size = 4
logging_steps = 1
save_strategy = "no"
gradient_checkpointing = false
seed = 0
"""


def tiny_recipe(**sections: dict) -> str:
    """TINY_RECIPE with keys changed or added per section, for a test whose run differs in a few keys:
    `tiny_recipe(data={"eval": held}, train={"max_steps": 2})`. A key the recipe has is replaced where it
    stands, a new one is added at the end of its section (a new section at the end of the text); a value of
    None removes the key. Values are written as TOML (strings quoted, booleans lower-case)."""

    def toml(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (str, Path)):
            return json.dumps(str(v))
        return repr(v)

    out: dict[str, list[str]] = {}
    section = ""
    for line in TINY_RECIPE.strip().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = []
        else:
            out[section].append(line)
    for name, keys in sections.items():
        lines = out.setdefault(name, [])
        for key, value in keys.items():
            at = [i for i, line in enumerate(lines) if line.split("=")[0].strip() == key]
            new = [] if value is None else [f"{key} = {toml(value)}"]
            if at:
                lines[at[0] : at[0] + 1] = new
            else:
                lines.extend(new)
    return "\n" + "".join(
        f"[{name}]\n" + "".join(f"{line}\n" for line in lines) for name, lines in out.items()
    )
