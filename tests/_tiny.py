"""Constants and helpers shared by the tests (importable as `_tiny` from tests/)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
DEMO = RECIPES / "data" / "demo.jsonl"


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


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
