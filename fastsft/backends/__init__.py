"""Model loading behind one interface: `load_model(recipe) -> Loaded(model, tokenizer, ...)`.

- `unsloth`: `FastLanguageModel` (CUDA only), see `backends/unsloth.py`.
- `transformers`: `AutoModelForCausalLM` + bitsandbytes + PEFT, anywhere, see `backends/transformers.py`.
- `auto`: unsloth when a CUDA GPU is there and unsloth imports, else transformers, with one line
  saying which and why.

Nothing after this module asks which backend made the model, except `fastsft.loss`, which routes
each backend's loss.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendError
from . import builtin, gguf

__all__ = [
    "Loaded",
    "LoadPolicy",
    "choose_backend",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
    "compute_dtype",
]


@dataclass
class Loaded:
    model: Any  # a PeftModel (transformers) or Unsloth's PEFT model
    tokenizer: Any
    backend: str  # "unsloth" | "transformers"
    reason: str  # why this backend was picked
    model_path: str  # what was loaded: hub id or local folder
    dtype: str  # "bf16" | "fp16" | "fp32"
    info: dict = field(default_factory=dict)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - a broken torch install
        return False


def unsloth_status() -> tuple[bool, str]:
    """(usable, why). Never imports unsloth when there is no GPU (it refuses to import there)."""
    if importlib.util.find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install 'fastsft[gpu]')"
    if not cuda_available():
        return False, "no CUDA GPU (unsloth needs one)"
    return True, "a CUDA GPU and unsloth are present"


def choose_backend(requested: str) -> tuple[str, str]:
    """The backend to use for `[model] backend = requested`, and one line saying why."""
    ok, why = unsloth_status()
    if requested == "transformers":
        return "transformers", "the recipe asks for it"
    if requested == "unsloth":
        if not ok:
            raise BackendError(
                f"[model] backend = \"unsloth\" cannot run here: {why}. "
                "Use backend = \"transformers\" (or \"auto\") on this machine."
            )
        return "unsloth", "the recipe asks for it"
    if ok:
        return "unsloth", why
    return "transformers", f"auto: {why}"


def compute_dtype(requested: str) -> str:
    """`[model] dtype` -> "bf16" | "fp16" | "fp32" for this machine."""
    if requested != "auto":
        if requested in ("bf16", "fp16") and not cuda_available():
            return requested  # allowed (slow on CPU), the user asked
        return requested
    if not cuda_available():
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_model_path(recipe, *, log=print) -> str:
    """`[model] name` -> what from_pretrained should read: a built-in model's cache folder, a GGUF
    file's converted folder (see backends/gguf.py), a local folder (relative to the recipe), or a hub
    id."""
    name = recipe.model.name
    if builtin.is_builtin(name):
        return str(builtin.materialize(name))
    if gguf.is_gguf(name):
        return str(gguf.materialize(gguf.resolve_file(name, recipe.base_dir), log=log))
    local = recipe.resolve_path(name)
    if local.exists():
        return str(local)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise BackendError(f"[model] name = {name!r}: no such folder ({local})")
    _check_hub_reachable(name)
    return name  # a hub id


@dataclass(frozen=True)
class LoadPolicy:
    """What loading a model may do. Granted on the command line only (`--trust-remote-code`,
    `--allow-pickle`), never by a recipe or a folder someone sent: a run directory's recipe.toml says
    what its model needs, and every command that loads a model (run, generate, chat, eval, export,
    serve) goes through this one policy.

    - trust_remote_code: let transformers import and run Python code shipped with the model.
    - allow_pickle: read pickle weights (.bin/.pt), which can run code when loaded; otherwise only
      safetensors are read.
    """

    trust_remote_code: bool = False
    allow_pickle: bool = False

    def check_recipe(self, recipe, where: str | None = None) -> None:
        """BackendError when the recipe's model needs a permission this policy does not grant."""
        where = where or (str(recipe.path) if getattr(recipe, "path", None) else "the recipe")
        if recipe.model.trust_remote_code and not self.trust_remote_code:
            raise BackendError(
                f"{where}: [model] trust_remote_code = true: loading {recipe.model.name!r} would run Python code "
                "from the model's repository. Nothing was loaded. If you trust that code, pass "
                "--trust-remote-code on the command line."
            )

    def check_weights(self, path, what: str = "the model") -> None:
        """BackendError when folder `path` holds only pickle weights and pickle is not allowed."""
        p = Path(path)
        if self.allow_pickle or not p.is_dir():
            return
        pickles = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
                         and x.name not in ("training_args.bin",))  # fmt: skip
        if pickles and not any(p.glob("*.safetensors")):
            raise BackendError(
                f"{what} in {p} has only pickle weights ({', '.join(pickles[:3])}), which can run code when "
                "loaded; nothing was loaded. Convert them to safetensors, or pass --allow-pickle if you trust "
                "the files."
            )

    def from_pretrained_kwargs(self) -> dict:
        """trust_remote_code and use_safetensors for `from_pretrained`."""
        return {"trust_remote_code": self.trust_remote_code, "use_safetensors": None if self.allow_pickle else True}


def _check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """A hub id that is neither in the local cache nor reachable fails at once (from_pretrained
    would retry for over a minute before saying so)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # cached: from_pretrained can work offline
    except Exception:  # noqa: BLE001 - not a valid repo id: let from_pretrained say what is wrong
        return
    import socket
    from urllib.parse import urlparse

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return
        except OSError:
            offline = True
    raise BackendError(
        f"[model] name = {repo_id!r}: a hub id that is not in the local cache, and the hub cannot be reached "
        "(offline). Download it where there is a network (huggingface-cli download " + repo_id + "), point "
        "[model] name at a local folder or .gguf file, or use builtin:tiny-mistral."
    )


def _check_weights_format(path: str, allow_pickle: bool) -> None:
    p = Path(path)
    if not p.is_dir() or allow_pickle:
        return
    if not any(p.glob("*.safetensors")) and any(p.glob("*.bin")):
        raise BackendError(
            f"{path} holds only pickle (.bin) weights, which can run code when loaded. Convert them to "
            "safetensors, or set [model] allow_pickle = true if you trust the files."
        )


def load_tokenizer(recipe, model_path: str | None = None, *, policy: LoadPolicy | None = None):
    from transformers import AutoTokenizer

    policy = policy or LoadPolicy()
    policy.check_recipe(recipe)
    path = model_path or resolve_model_path(recipe)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=policy.trust_remote_code)
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load the tokenizer of {path!r}: {e}") from None
    return tok


def flush_denormals() -> bool:
    """On a CPU-only machine, flush denormal floats to zero (x86 FTZ/DAZ; a no-op where unsupported).
    Tiny activations and gradients of a real model (SmolLM2-135M) fall into the denormal range, and the
    CPU handles those in microcode, many times slower; values below 1.2e-38 never matter to the result.
    Returns whether it is on."""
    import torch

    if torch.cuda.is_available():
        return False
    return bool(torch.set_flush_denormal(True))


def check_target_modules(model, targets, *, where: str = "[lora] target_modules") -> None:
    """Every name in a `target_modules` list must name a module of `model` (PEFT silently skips a
    misspelt one when another matches, and trains an adapter without it)."""
    import difflib

    if isinstance(targets, str):
        return  # "all-linear" (or a regex, which PEFT matches itself)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [t for t in targets if t not in names and not any(n.endswith(f".{t}") or n == t for n, _ in model.named_modules())]
    if not missing:
        return
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.startswith("Linear")} - {"lm_head"})
    hints = []
    for t in missing:
        close = difflib.get_close_matches(t, linear, n=1, cutoff=0.6)
        hints.append(f"{t!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise BackendError(
        f"{where}: {', '.join(hints)} match{'es' if len(missing) == 1 else ''} no module of the model, so "
        f"{'it' if len(missing) == 1 else 'they'} would get no adapter. The model's linear layers are: "
        f"{', '.join(linear)} (or use \"all-linear\")."
    )


def load_model(recipe, *, log=print, policy: LoadPolicy | None = None) -> Loaded:
    policy = policy or LoadPolicy()
    policy.check_recipe(recipe)
    backend, reason = choose_backend(recipe.model.backend)
    from .. import dist

    if backend == "unsloth" and dist.world_size() > 1:
        if recipe.model.backend != "auto":
            raise BackendError(
                f'[model] backend = "unsloth" under {dist.world_size()} processes: Unsloth\'s backend is '
                'single-GPU. Use backend = "transformers" (or "auto") for DDP / FSDP / DeepSpeed runs.'
            )
        backend, reason = "transformers", f"auto: {dist.world_size()} processes, and Unsloth's backend is single-GPU"
    log(f"backend: {backend} ({reason})")
    if backend == "unsloth":
        # Unsloth patches transformers, trl and peft when it is imported, so it must come first.
        from . import unsloth as impl

        impl.import_unsloth_first()
    else:
        from . import transformers as impl
    path = resolve_model_path(recipe, log=log)
    policy.check_weights(path)
    if policy.trust_remote_code:
        log("warning: --trust-remote-code: the model repository's own Python code may run")
    dtype = compute_dtype(recipe.model.dtype)
    from transformers import set_seed  # after unsloth's import (above), as Unsloth needs

    set_seed(recipe.train.seed)  # python, numpy, torch, CUDA: the LoRA init is random; same seed, same run
    model, tokenizer, info = impl.load(recipe, path, dtype, policy=policy)
    return Loaded(model, tokenizer, backend, reason, path, dtype, info)
