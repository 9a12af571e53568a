"""The export transaction: `export_run(RUN_DIR, fmt=..., to=...)` for every format.

The run is read (export/read.py), the destination checked (never a run, never a folder holding one or
anything but an earlier export) and its free space measured against the export's size; the export
(merged.py, adapter.py, gguf.py) is written into a temporary folder beside its destination and renamed
at the end, so a failure leaves nothing and an existing destination is replaced only with `overwrite`.
`export.json` in the folder records what was done and the checks' numbers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

from fastsft import files, limits
from fastsft.backends.common import torch_dtype
from fastsft.errors import ExportError
from fastsft.export.adapter import export_adapter
from fastsft.export.gguf import export_gguf, llama_cpp_quantizer
from fastsft.export.merged import export_merged
from fastsft.export.read import RunInfo, _print, read_run
from fastsft.recipe import EXPORT_DTYPES, EXPORT_FORMATS, GGUF_K_QUANTS, GGUF_QUANTS
from fastsft.rundir import RECIPE, RUN_JSON, is_run_dir

EXPORT_JSON = "export.json"


def export_run(
    run_dir: str | Path,
    *,
    fmt: str,
    to: str | Path | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    console=None,
    policy=None,
    recipe=None,
) -> Path:
    """Export the run in `run_dir` as `fmt` (merged | adapter | gguf) into `to`
    (default RUN_DIR/export-<fmt>) and return that folder. `policy` (backends.LoadPolicy) is what loading
    the base model may do; `recipe`: the run's recipe as its recipe.toml holds it, handed by the run that
    has just finished (None: read from the run directory). Raises ExportError."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}.")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of: {', '.join(EXPORT_DTYPES)}.")
    if dtype in GGUF_QUANTS and fmt != "gguf":
        raise ExportError(
            f"--dtype {dtype} is a GGUF quantisation (llama.cpp's block type); a {fmt} export is 16- or 32-bit: "
            "use --dtype bf16, fp16 or fp32, or --format gguf."
        )
    if fmt == "gguf" and dtype in GGUF_K_QUANTS:
        llama_cpp_quantizer(dtype)  # refused before the run is read and its model loaded
    run = read_run(run_dir, policy=policy, recipe=recipe)
    target = Path(to) if to is not None else run.path / f"export-{fmt}"
    _prepare_destination(run, target, fmt, dtype, overwrite=overwrite)
    tmp = files.temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        what = fmt if fmt == "adapter" else f"{fmt} ({dtype})"
        _print(console, f"export {what} of {run.path} -> {target}")
        _write_export(run, fmt, dtype, tmp, console=console)
        _swap_in(tmp, target)
    except Exception as e:  # ENOSPC, EIO... while writing: nothing is left half-written
        if not files.is_write_error(e) or isinstance(e, ExportError):
            raise
        where = getattr(e, "filename", None) or tmp
        cause = (
            files.describe_os_error(e, where) if isinstance(e, OSError) else str(e).strip().splitlines()[0]
        )
        full = (
            getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in cause or "quota" in cause
        )
        raise ExportError(
            f"the {fmt} export to {target} failed: {cause}; nothing was written"
            f"{' and the previous export is kept' if target.exists() else ''}. "
            f"{'Free some space or choose' if full else 'Choose'} another --to."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(console, f"exported {fmt}: {target}", style="green")
    return target


def _prepare_destination(run: RunInfo, target: Path, fmt: str, dtype: str, *, overwrite: bool) -> None:
    """Refuse a destination that would lose data, make its parent, clear what killed exports left there,
    and check the free space before anything is loaded (a full disk would fail at the very end)."""
    check_destination(target, run.path, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--to {target}: {files.describe_os_error(e, target.parent)}") from None
    try:  # a read-only or foreign folder is told as such, before the free space (0 on a read-only mount)
        files.temp_dir(target.parent, f".{target.name}.tmp-").rmdir()
    except files.WriteFailed as e:
        raise ExportError(f"--to {target}: {e}; nothing was written. Choose another --to.") from None
    files.remove_stale(target.parent, f".{target.name}.tmp-")  # left by killed exports
    files.remove_stale(target.parent, f".{target.name}.old-")
    if fmt != "adapter":
        need = export_bytes(run, dtype)
        if need is not None:
            limits.check_disk(
                target.parent, need, f"the {fmt} export ({dtype})", flag="--to", error=ExportError
            )


def _write_export(run: RunInfo, fmt: str, dtype: str, out: Path, *, console=None) -> dict:
    """Write the export into folder `out` with its export.json (what was done, the checks' numbers)."""
    t0 = time.perf_counter()
    if fmt == "merged":
        record = export_merged(run, out, dtype=dtype, console=console)
    elif fmt == "adapter":
        record = export_adapter(run, out, console=console)
    else:
        record = export_gguf(run, out, dtype=dtype, console=console)
    record = {
        "format": fmt,
        "dtype": dtype if fmt != "adapter" else None,
        "run_dir": str(run.path.resolve()),
        "base_model": run.recipe.model.name if run.recipe is not None else run.base_path,
        "base_path": run.base_path,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 2),
        **record,
    }
    files.write_text(out / EXPORT_JSON, json.dumps(record, indent=2, default=str) + "\n")
    files.apply_umask(out)
    return record


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` to `target`; an earlier export there is moved aside first and
    put back when anything fails, deleted when all went well."""
    old = None
    try:
        if target.exists():
            old = files.temp_dir(target.parent, f".{target.name}.old-")
            os.replace(target, old / "export")
        os.replace(tmp, target)
    except BaseException:
        if old is not None and (old / "export").exists() and not target.exists():
            os.replace(old / "export", target)  # put the previous export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_destination(target: Path, run_path: Path, *, overwrite: bool) -> None:
    """Refuse a --to that would lose data: a symbolic link, a file, the run being exported or a folder
    holding it, a folder holding any fastsft run, or (even with `overwrite`) anything but an earlier
    export. Nothing is changed when refused."""
    if target.is_symlink():
        raise ExportError(
            f"--to {target} is a symbolic link; fastsft never writes through a link. Choose another --to."
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file, not a folder; nothing was changed. Choose another --to.")
    t, r = target.resolve(), run_path.resolve()
    if t == r or t in r.parents:
        raise ExportError(
            f"--to {target} is the run being exported{'' if t == r else ' or a folder that holds it'}; "
            f"nothing was changed. Choose a new folder, e.g. {run_path / 'export-merged'}."
        )
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise ExportError(
            f"{target} already exists; nothing was changed. "
            "Pass --overwrite to replace it, or choose another --to."
        )
    if not (target / EXPORT_JSON).is_file() or is_run_dir(target) or _holds_a_run(target):
        raise ExportError(
            f"--to {target} holds files that are not a fastsft export; nothing was changed. --overwrite only "
            "ever replaces an earlier export: choose another --to."
        )


def _holds_a_run(folder: Path, limit: int = 10000) -> bool:
    """Whether a fastsft run directory lies anywhere under `folder` (looked for in at most `limit` folders)."""
    for n, (_root, _dirs, names) in enumerate(os.walk(folder)):
        if RUN_JSON in names and RECIPE in names:
            return True
        if n > limit:
            return True  # too big to tell: refuse rather than guess
    return False


def export_bytes(run: RunInfo, dtype: str) -> int | None:
    """About the size of a merged or GGUF export: the base model's parameters (counted on the meta
    device, tied weights once) in `dtype`, plus the tokenizer; None when the config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(run.base_path, trust_remote_code=run.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=run.trust_remote_code)
    except Exception:  # noqa: BLE001 - the export itself will say what is wrong with the base
        return None
    n = sum(p.numel() for p in model.parameters())
    itemsize = 2 if dtype in GGUF_QUANTS else torch_dtype(dtype).itemsize  # quantised files: under 16-bit
    return int(n * itemsize * 1.02) + 64 * 2**20
