"""Loading a trained model to use it: `load_for_use(model_ref) -> LoadedForUse`, for `generate`, `chat`,
`evaluate` and `serve`.

A model reference is one of
- a run directory (RUN_DIR/adapter + recipe.toml): the base model loaded as it was trained (4-bit NF4
  when the recipe says so) with the adapter attached; or, for a full fine-tune, its RUN_DIR/model;
- an adapter folder (adapter_config.json): its base model (from adapter_config.json) + the adapter;
- a merged export or any local Hugging Face model folder (config.json);
- a base model named as a recipe names it: `builtin:tiny-mistral`, `package:PKG/FILE.gguf`, a local
  `FILE.gguf` (converted once into fastsft's cache, as training converts it: fastsft.backends.gguf).

Results name the model as the user wrote it (`LoadedForUse.ref`), never by its cache folder.

Models load through the backend's loader (`fastsft.backends.transformers.load_trained`: the base as
trained, its embeddings grown to the run's tokenizer, the adapter attached); prompts go through the
tokenizer's chat template and answers come from `fastsft.chat.generation`, stopping on the template's
end-of-turn token (`fastsft.chat.templates.end_of_turn_ids`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fastsft.backends import LoadPolicy, builtin, compute_dtype, gguf
from fastsft.backends.common import tokenizer_from
from fastsft.backends.transformers import load_base, load_trained
from fastsft.chat.templates import end_of_turn_ids
from fastsft.errors import BackendError
from fastsft.export import read_run
from fastsft.rundir import ADAPTER, MODEL, RUN_JSON, RunDir, is_run_dir


@dataclass
class LoadedForUse:
    model: object
    tokenizer: object
    kind: str  # "run" | "adapter" | "model"
    path: Path
    run_dir: Path | None = None
    recipe: object | None = None
    eot: list[int] = field(default_factory=list)
    ref: str = ""  # the model as the user named it (a GGUF file, `package:...`, a folder)

    @property
    def name(self) -> str:
        """A short name for the model: the user's GGUF or built-in name, else the folder's name."""
        if builtin.is_builtin(self.ref) or gguf.is_gguf(self.ref):
            return Path(self.ref.split(":", 1)[-1]).name.removesuffix(".gguf")
        return self.path.resolve().name

    def __iter__(self):  # model, tokenizer = load_for_use(...)
        return iter((self.model, self.tokenizer))


def _default_dtype() -> str:
    return compute_dtype("auto")


def _named_base(model_ref):
    """A base model named as a recipe names it (`builtin:NAME`, `package:PKG/FILE.gguf`, a `.gguf` file)
    -> the folder training reads for it (made once in fastsft's cache), so the base is evaluated as it
    was trained. A GGUF file is read as the recipe's `[model] name` reads it, whatever made it."""
    name = str(model_ref)
    if builtin.is_builtin(name):
        return builtin.materialize(name)
    if name.startswith(gguf.PACKAGE_PREFIX) or (name.lower().endswith(".gguf") and Path(name).is_file()):
        return gguf.materialize(gguf.resolve_file(name), log=lambda m: None)
    return model_ref


def _check_ref(model_ref) -> Path:
    """The folder `model_ref` names, or a BackendError saying what to pass instead."""
    path = Path(model_ref)
    if not path.exists():
        raise BackendError(
            f"{path}: no such folder or GGUF file. Pass a run directory (runs/<name>), an export "
            f"(RUN_DIR/export-merged), a local model folder, a GGUF file, or a base as a recipe names it "
            f"(builtin:NAME, package:PKG/FILE.gguf)."
        )
    if path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists():
        files = sorted(p.name for p in path.glob("*.gguf"))
        raise BackendError(
            f"{path} is a folder of GGUF files ({', '.join(files)}): pass one of them, e.g. {path / files[0]}"
        )
    if path.is_file():
        raise BackendError(f"{path} is a file; pass a run directory, a model folder or a .gguf file.")
    return path


def _load_run(path: Path, dtype: str | None, policy) -> LoadedForUse:
    """A run directory: the base as the run trained it (4-bit NF4 when the recipe says so) + its adapter."""
    run = read_run(path, policy=policy)
    tok = run.tokenizer()
    model = run.load(dtype or run.train_dtype, load_in_4bit=run.load_in_4bit, tokenizer=tok)
    return LoadedForUse(model, tok, "run", path, run_dir=path, recipe=run.recipe)


def _load_adapter(path: Path, dtype: str | None, policy) -> LoadedForUse:
    """An adapter folder: the base named in its adapter_config.json + the adapter."""
    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise BackendError(
            f"{path}/adapter_config.json does not name its base model (base_model_name_or_path)."
        )
    tok = tokenizer_from(path, base_path, policy=policy)
    model = load_trained(base_path, path, dtype or _default_dtype(), tokenizer=tok, policy=policy)
    return LoadedForUse(model, tok, "adapter", path)


def _load_model(path: Path, dtype: str | None, policy) -> LoadedForUse:
    """A merged export or any local Hugging Face model folder, on the GPU when there is one."""
    model = load_base(str(path), dtype or _default_dtype(), policy=policy, on_gpu=True, what="the model")
    return LoadedForUse(model, tokenizer_from(path, policy=policy), "model", path)


def _no_weights_yet(path: Path) -> str:
    """What to do with a run directory that stopped before it wrote adapter/ (or model/): resume it."""
    try:
        status = json.loads((path / RUN_JSON).read_text(encoding="utf-8")).get("status") or "unknown"
    except (OSError, ValueError, AttributeError):
        status = "unknown"
    kept = RunDir(path).latest_checkpoint()
    if kept:
        todo = (
            f"Resume it from its checkpoint at step {kept[0]}: fastsft run --resume {path} "
            "(it writes adapter/ when it finishes)"
        )
    else:
        todo = (
            f"It kept no checkpoint either: fastsft run --resume {path} has nothing to continue from, so start "
            f"it again: fastsft run RECIPE -o {path} --overwrite"
        )
    return (
        f"{path} is a fastsft run that stopped before it wrote its first adapter (run.json status: {status}; "
        f"no {ADAPTER}/ or {MODEL}/ yet), so there is no trained model to use. {todo}"
    )


def load_for_use(model_ref, *, dtype: str | None = None, policy=None) -> LoadedForUse:
    """A run directory, adapter folder, model folder, GGUF file or a base as a recipe names it ->
    `LoadedForUse` (unpacks as `model, tokenizer`).
    `policy` (backends.LoadPolicy; default: no remote code, no pickle) is what loading may do, whatever
    the folder's recipe.toml says."""
    import torch

    if isinstance(model_ref, LoadedForUse):
        return model_ref
    policy = policy or LoadPolicy()
    path = _check_ref(_named_base(model_ref))
    ref = str(model_ref)
    if (path / ADAPTER / "adapter_config.json").exists() or (path / MODEL / "config.json").exists():
        loaded = _load_run(path, dtype, policy)  # a LoRA run, or a full fine-tune's (model/, no adapter)
    elif (path / "adapter_config.json").exists():
        loaded = _load_adapter(path, dtype, policy)
    elif (path / "config.json").exists():
        loaded = _load_model(path, dtype, policy)
    elif is_run_dir(path):
        raise BackendError(_no_weights_yet(path))
    else:
        raise BackendError(
            f"{path} is neither a run directory (no adapter/ or model/), an adapter folder (no adapter_config.json) "
            "nor a model folder (no config.json)."
        )
    quantized = getattr(getattr(loaded.model, "config", None), "quantization_config", None) is not None
    if torch.cuda.is_available() and loaded.kind != "model" and not quantized:
        loaded.model.to("cuda")
    loaded.ref = ref
    loaded.eot = end_of_turn_ids(loaded.tokenizer)
    if loaded.tokenizer.pad_token_id is None and loaded.eot:
        loaded.tokenizer.pad_token_id = loaded.eot[-1]
    return loaded
