"""What `fastsft validate` checks beyond the schema: the things `fastsft run` would refuse later, found
without loading a model (files, names, installed packages, and target modules against the model's
config where that config is on this machine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastsft import data as data_mod
from fastsft import machine
from fastsft.backends import builtin, check_target_modules, gguf
from fastsft.chat.templates import load_template
from fastsft.errors import FastSFTError
from fastsft.run import trackers


def problems(recipe) -> list[str]:
    """Every problem of `recipe` that `fastsft run` would stop on, as one line each."""
    out: list[str] = []
    m, d = recipe.model, recipe.data
    if builtin.is_builtin(m.name):
        short = m.name[len(builtin.BUILTIN_PREFIX) :]
        if short not in builtin.TINY_CONFIGS:
            out.append(
                f"[model] name = {m.name!r}: unknown built-in model; built-in models are: "
                f"{', '.join(builtin.builtin_names())}"
            )
    elif gguf.is_gguf(m.name):
        try:
            gguf.resolve_file(m.name, recipe.base_dir)
        except FastSFTError as e:
            out.append(str(e))
    else:
        local = recipe.resolve_path(m.name)
        if not local.exists() and (m.name.startswith((".", "/", "~")) or m.name.count("/") > 1):
            out.append(f"[model] name = {m.name!r}: no such folder ({local})")
    for key in ("train", "eval", "retain"):
        value = getattr(d, key)
        if value:
            path = recipe.resolve_path(value)
            if data_mod.is_local(value, path) and not path.exists():
                out.append(f"data.{key} = {value!r}: file not found: {path}")
    for i, source in enumerate(d.sources or [], start=1):
        path = recipe.resolve_path(source["path"])
        if data_mod.is_local(source["path"], path) and not path.exists():
            out.append(f"[[data.sources]] #{i} path = {source['path']!r}: file not found: {path}")
    out += _retain_problems(recipe)
    out += trackers.missing(recipe)
    if d.chat_template:
        try:
            load_template(d.chat_template, recipe.base_dir)
        except FastSFTError as e:
            out.append(str(e))
    if recipe.loss.kernel == "unsloth" and importlib.util.find_spec("unsloth") is None:
        out.append(
            "[loss] kernel = \"unsloth\": unsloth is not installed (pip install 'fastsft[gpu]' on a CUDA "
            'machine); use kernel = "auto"'
        )
    if m.backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
        out.append('[model] backend = "unsloth": unsloth is not installed; use backend = "auto"')
    out += _target_problems(recipe)
    return out


def _retain_problems(recipe) -> list[str]:
    """`[data] retain` naming a file the run trains on (the same file, or one with the same bytes): its
    "forgetting" would be the loss on training data, which falls as the run learns it."""
    import hashlib

    d = recipe.data
    retain = recipe.resolve_path(d.retain) if d.retain else None
    if retain is None or not retain.is_file():
        return []
    trained = [("data.train", d.train)] if d.train else []
    trained += [(f"[[data.sources]] #{i} path", s["path"]) for i, s in enumerate(d.sources or [], start=1)]
    digest = None
    for key, value in trained:
        path = recipe.resolve_path(value)
        if not path.is_file():
            continue
        if path.resolve() == retain.resolve():
            how = "is the same file as"
        elif path.stat().st_size == retain.stat().st_size:
            digest = digest or hashlib.sha256(retain.read_bytes()).digest()
            if hashlib.sha256(path.read_bytes()).digest() != digest:
                continue
            how = "has the same content as"
        else:
            continue
        return [
            f"data.retain = {d.retain!r} {how} {key} = {value!r}: the retain set measures forgetting on "
            "data the run does not train on, and training data only gets easier. Point data.retain at general "
            "data kept out of training (e.g. a chat or instruction set), or drop it"
        ]
    return []


def _target_problems(recipe) -> list[str]:
    """Target modules against the model built on the meta device from a config on this machine."""
    targets = recipe.lora.target_modules
    if isinstance(targets, str):
        return []
    name = recipe.model.name
    if builtin.is_builtin(name):
        folder = (
            machine.cache_root()
            / "builtin"
            / f"{name[len(builtin.BUILTIN_PREFIX) :]}-v{builtin.BUILTIN_VERSION}"
        )
    elif gguf.is_gguf(name):
        try:
            folder = gguf._cache_folder(gguf.resolve_file(name, recipe.base_dir))
        except FastSFTError:
            return []
    else:
        folder = recipe.resolve_path(name)
    if not (Path(folder) / "config.json").is_file():
        return []  # not on this machine yet: `fastsft run` checks once the model is loaded
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=recipe.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        check_target_modules(model, targets)
    except FastSFTError as e:
        return [str(e)]
    except Exception:  # noqa: BLE001 - an unusual config: `fastsft run` will say what is wrong
        return []
    return []
