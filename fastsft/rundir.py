"""The run directory: everything a run writes goes through here.

    RUN_DIR/
      recipe.toml       the resolved recipe (overrides applied, defaults filled in)
      run.json          versions, device, seed, backend, loss route, data fingerprint and stats, outcome
      metrics.jsonl     one JSON object per logged step
      checkpoints/      the Trainer's checkpoint-N folders
      adapter/          the PEFT adapter + tokenizer (with its chat template)
      report.md         the summary, with loss.png (the loss curve)

An existing non-empty folder is refused unless `overwrite`; nothing of the old run is touched when
refused. Files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import RunDirError

RECIPE = "recipe.toml"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
REPORT = "report.md"
LOSS_PNG = "loss.png"


def default_path(recipe_path: str | Path, root: str | Path = "runs") -> Path:
    """runs/<recipe name>-<YYYYmmdd-HHMMSS>"""
    stem = Path(recipe_path).stem
    return Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunDir:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--output-dir {path} is a file, not a folder. Choose another --output-dir.")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                what = "a fastsft run" if (path / RUN_JSON).exists() else "files"
                raise RunDirError(
                    f"{path} already holds {what}; nothing was changed. Choose another --output-dir, "
                    "or pass --overwrite to replace it."
                )
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory, to resume."""
        path = Path(path)
        missing = [n for n in (RECIPE, RUN_JSON) if not (path / n).is_file()]
        if not path.is_dir() or missing:
            raise RunDirError(
                f"--resume {path}: not a fastsft run directory (missing {', '.join(missing) or 'the folder'}). "
                "Pass the folder that `fastsft run` printed as its run directory."
            )
        return cls(path)

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first. A checkpoint is complete when
        its trainer_state.json parses; staging folders of an interrupted save never count."""
        out = []
        if not self.checkpoints.is_dir():
            return out
        for d in self.checkpoints.iterdir():
            name = d.name
            if not (d.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit()):
                continue
            try:
                json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            out.append((int(name[len("checkpoint-") :]), d))
        return sorted(out)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows logged after `after_step` (they will be logged again on resume)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        self.write_text(METRICS, "".join(json.dumps(r, default=float) + "\n" for r in rows))

    # paths
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    # writing
    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
        except BaseException:
            with _suppress():
                os.unlink(tmp)
            raise
        return target

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def update_json(self, name: str, **fields) -> None:
        obj = self.read_json(name) if (self.path / name).exists() else {}
        obj.update(fields)
        self.write_json(name, obj)

    def append_metrics(self, row: dict) -> None:
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def read_metrics(self) -> list[dict]:
        p = self.path / METRICS
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True
