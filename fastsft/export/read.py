"""The finished run an export reads: `read_run(RUN_DIR) -> RunInfo` (the adapter or full model, its
base, recipe and run.json), and the console and memory helpers every export step shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastsft import recipe as recipe_mod
from fastsft.backends import LoadPolicy, compute_dtype, resolve_model_path
from fastsft.backends.common import tokenizer_from
from fastsft.backends.transformers import load_base, load_trained
from fastsft.errors import ExportError
from fastsft.rundir import ADAPTER, MODEL, RECIPE, RUN_JSON


def _print(console, msg: str, style: str | None = None) -> None:
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    console.print(msg, style=style, highlight=False, markup=False, soft_wrap=True)


@dataclass
class RunInfo:
    path: Path
    adapter: Path
    recipe: object | None  # fastsft.recipe.Recipe
    run_json: dict
    base_path: str  # what from_pretrained reads for the base model
    train_dtype: str  # compute dtype of the run: bf16 | fp16 | fp32
    load_in_4bit: bool
    trust_remote_code: bool  # granted by the command line (backends.LoadPolicy), never by the recipe
    allow_pickle: bool = False
    # a full fine-tune ([train] method = "full"): no adapter; `adapter` and `base_path` are both RUN/model,
    # the trained model itself, which merged / gguf export as they are
    full: bool = False

    @property
    def policy(self):
        """What loading this run's models may do (backends.LoadPolicy)."""
        return LoadPolicy(trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)

    def tokenizer(self):
        """The run's tokenizer: the adapter folder's (chat template and any added pad token), else the base's."""
        return tokenizer_from(self.adapter, self.base_path, policy=self.policy)

    def load(self, dtype: str, *, load_in_4bit: bool = False, upcast: bool = False, tokenizer=None):
        """Base model + the run's adapter (backends.transformers.load_trained); a full fine-tune's model."""
        if self.full:
            model = load_base(self.base_path, dtype, policy=self.policy, what="the fine-tuned model")
            return model.float() if upcast else model

        return load_trained(
            self.base_path,
            self.adapter,
            dtype,
            tokenizer=tokenizer or self.tokenizer(),
            load_in_4bit=load_in_4bit,
            upcast=upcast,
            policy=self.policy,
        )


def read_run(run_dir: str | Path, *, policy=None, recipe=None) -> RunInfo:
    """The run directory's recipe, run.json and base model, or an ExportError saying what is missing.
    `policy` (backends.LoadPolicy, default: neither remote code nor pickle) is what loading may do;
    `recipe`: the run's recipe when the caller holds it (the run that wrote recipe.toml), else read."""
    policy = policy or LoadPolicy()

    path = Path(run_dir)
    if not path.is_dir():
        raise ExportError(
            f"{path}: no such run directory. Pass the folder `fastsft run` wrote (runs/<name>)."
        )
    adapter = path / ADAPTER
    if not (adapter / "adapter_config.json").exists() and (path / MODEL / "config.json").exists():
        return _read_full_run(path, policy, recipe)
    if not (adapter / "adapter_config.json").exists():
        raise ExportError(
            f"{path} has no trained adapter ({adapter}/adapter_config.json is missing). "
            "Export a run that finished: `fastsft run` writes the adapter at the end of training."
        )
    run_json, recipe = _run_json_and_recipe(path, policy, recipe)
    check_adapter(adapter)

    recorded = run_json.get("model_path")
    base_path = None
    if recorded and Path(recorded).exists():
        base_path = recorded  # the folder the run trained on
    elif recipe is not None:
        base_path = resolve_model_path(recipe)  # a builtin model is re-made if its cache was cleared
    elif recorded:
        base_path = recorded  # a hub id
    else:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise ExportError(f"{path}: cannot tell the base model (no recipe.toml, no model_path in run.json).")

    train_dtype = run_json.get("dtype") or (
        compute_dtype(recipe.model.dtype) if recipe is not None else "fp32"
    )
    return RunInfo(
        path=path,
        adapter=adapter,
        recipe=recipe,
        run_json=run_json,
        base_path=str(base_path),
        train_dtype=train_dtype,
        load_in_4bit=bool(recipe.model.load_in_4bit) if recipe is not None else False,
        trust_remote_code=policy.trust_remote_code,
        allow_pickle=policy.allow_pickle,
    )


def _damaged(path: Path, what: str) -> ExportError:
    run = path.parent.parent
    return ExportError(
        f"{path} {what}: the run's adapter is damaged (a copy cut short, or an edit). Copy the run again from "
        f"where it was made, or use a checkpoint's adapter ({run / 'checkpoints'}/checkpoint-N: fastsft run "
        f"--resume {run} finishes from the latest one and writes adapter/ again)."
    )


def check_adapter(adapter: Path) -> None:
    """An adapter folder that PEFT would fail on with a traceback, or load into a model that answers
    nothing: adapter_config.json that is not a JSON object, adapter weights cut short or unreadable, or a
    weight that is NaN or infinite (training diverged). An ExportError naming the file and the tensor."""
    import torch
    from safetensors import safe_open

    config = adapter / "adapter_config.json"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _damaged(config, f"cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _damaged(config, "is not a JSON object")
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        if (adapter / "adapter_model.bin").exists():
            return  # a pickle: read only with --allow-pickle, by the loader that says so
        raise _damaged(weights, "is missing")
    try:
        with safe_open(str(weights), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = "NaN" if bool(torch.isnan(t).any()) else "infinite"
                    raise ExportError(
                        f"{weights}: the adapter holds {bad} values in {name}: training diverged before it was "
                        "saved, so any export of it would answer nothing. Export a checkpoint from before the "
                        f"divergence ({adapter.parent / 'checkpoints'}), or train again with a lower "
                        "train.learning_rate."
                    )
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, OSError: a file cut short
        raise _damaged(
            weights, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _run_json_and_recipe(path: Path, policy, recipe=None) -> tuple[dict, object]:
    """A run directory's run.json ({} when absent) and recipe (`recipe` when given, else read; None when
    absent), the recipe checked against what `policy` allows."""
    run_json = {}
    if (path / RUN_JSON).exists():
        try:
            run_json = json.loads((path / RUN_JSON).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{path / RUN_JSON} cannot be read: {e}") from None
    if recipe is None:
        recipe = recipe_mod.load(path / RECIPE) if (path / RECIPE).exists() else None
    if recipe is not None:
        policy.check_recipe(recipe, where=str(path / RECIPE))
    return run_json, recipe


def _read_full_run(path: Path, policy, recipe=None) -> RunInfo:
    """A full fine-tune's run directory: its model/ folder is the trained model."""
    run_json, recipe = _run_json_and_recipe(path, policy, recipe)
    model = path / MODEL
    return RunInfo(
        path=path,
        adapter=model,
        recipe=recipe,
        run_json=run_json,
        base_path=str(model),
        train_dtype=run_json.get("dtype") or "fp32",
        load_in_4bit=False,
        trust_remote_code=policy.trust_remote_code,
        allow_pickle=policy.allow_pickle,
        full=True,
    )


def _collect() -> None:
    import gc

    gc.collect()
