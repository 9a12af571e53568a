"""Model loading behind one interface: `load_model(recipe) -> Loaded(model, tokenizer, ...)`.

- `unsloth`: `FastLanguageModel` (CUDA only), see `backends/unsloth.py`.
- `transformers`: `AutoModelForCausalLM` + bitsandbytes + PEFT, anywhere, see `backends/transformers.py`.
- `auto`: unsloth when a CUDA GPU is there and unsloth imports, else transformers, with one line
  saying which and why.

Nothing after this module asks which backend made the model, except `fastsft.loss.route`, which routes
each backend's loss.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from .. import dist
from ..errors import BackendError
from . import builtin, common, gguf
from .common import LoadPolicy, check_target_modules, compute_dtype, cuda_available, torch_dtype

__all__ = [
    "Loaded",
    "LoadPolicy",
    "Start",
    "start",
    "choose_backend",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
    "compute_dtype",
    "check_target_modules",
    "cuda_available",
    "torch_dtype",
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
                f'[model] backend = "unsloth" cannot run here: {why}. '
                'Use backend = "transformers" (or "auto") on this machine.'
            )
        return "unsloth", "the recipe asks for it"
    if ok:
        return "unsloth", why
    return "transformers", f"auto: {why}"


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


def load_tokenizer(recipe, model_path: str | None = None, *, policy: LoadPolicy | None = None):
    """The tokenizer of the recipe's model (`model_path` when already resolved)."""
    policy = policy or LoadPolicy()
    policy.check_recipe(recipe)
    return common.tokenizer_from(model_path or resolve_model_path(recipe), policy=policy)


def flush_denormals() -> bool:
    """On a CPU-only machine, flush denormal floats to zero (x86 FTZ/DAZ; a no-op where unsupported).
    Tiny activations and gradients of a real model (SmolLM2-135M) fall into the denormal range, and the
    CPU handles those in microcode, many times slower; values below 1.2e-38 never matter to the result.
    Returns whether it is on."""
    import torch

    if torch.cuda.is_available():
        return False
    return bool(torch.set_flush_denormal(True))


@dataclass
class Start:
    """What loading decides before any weight is read: the backend (Unsloth imported first when it is
    the one), the model folder, the dtype. `tokenizer()` is the model folder's tokenizer, for preparing
    the data before the model loads; `load()` then reads the weights."""

    recipe: Any
    backend: str
    reason: str
    impl: Any
    path: str
    dtype: str
    policy: LoadPolicy

    def tokenizer(self):
        return common.tokenizer_from(self.path, policy=self.policy)

    def load(self, *, log=print, tokenizer=None) -> Loaded:
        """The model with its adapter. `tokenizer` (from `tokenizer()`, set up by the data) is the one
        kept on the transformers backend; Unsloth returns its own, which the caller sets up in turn."""
        recipe = self.recipe
        from transformers import set_seed  # after unsloth's import (start()), as Unsloth needs

        # python, numpy, torch, CUDA: the LoRA init is random; same seed, same run
        set_seed(recipe.train.seed)
        kw = {"tokenizer": tokenizer} if self.backend == "transformers" else {}  # Unsloth makes its own
        model, own_tokenizer, info = self.impl.load(recipe, self.path, self.dtype, policy=self.policy, **kw)
        info["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        if recipe.train.method == "full":
            log(f"full fine-tuning: all {info['trainable_parameters']:,} weights train")
        return Loaded(model, own_tokenizer, self.backend, self.reason, self.path, self.dtype, info)


def start(recipe, *, log=print, policy: LoadPolicy | None = None) -> Start:
    """The backend chosen (and said), Unsloth imported first when chosen, the model folder resolved (a
    built-in or GGUF model made once) and checked against the loading policy: no weights read yet."""
    policy = policy or LoadPolicy()
    policy.check_recipe(recipe)
    backend, reason = choose_backend(recipe.model.backend)
    if backend == "unsloth" and dist.world_size() > 1:
        if recipe.model.backend != "auto":
            raise BackendError(
                f'[model] backend = "unsloth" under {dist.world_size()} processes: Unsloth\'s backend is '
                'single-GPU. Use backend = "transformers" (or "auto") for DDP / FSDP / DeepSpeed runs.'
            )
        backend, reason = (
            "transformers",
            f"auto: {dist.world_size()} processes, and Unsloth's backend is single-GPU",
        )
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
    return Start(recipe, backend, reason, impl, path, compute_dtype(recipe.model.dtype), policy)


def load_model(recipe, *, log=print, policy: LoadPolicy | None = None) -> Loaded:
    """`start(recipe)` then its `load()`: the model, its adapter and its own tokenizer."""
    return start(recipe, log=log, policy=policy).load(log=log)
