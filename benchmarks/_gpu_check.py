"""gpu_check.sh's bookkeeping: after each part, its figures go into $OUT (summary.json + summary.md,
rewritten whole each time, so a stop keeps every part that finished), with the plots the benchmarks drew.

    python benchmarks/_gpu_check.py collect --out OUT --work WORK --part NAME --rc RC --seconds S --limit L

A pytest part (kernels, unsloth, tests) is read from WORK/NAME.jsonl (_gpu_report.py writes a line as each
test finishes): passed, failed (with the first line of each failure), skipped (with the reason). A benchmark part (loss, e2e) is read
from WORK/NAME/summary.json (FASTSFT_BENCH_OUT: the benchmark checkpoints it after every test, so a part
stopped by its timeout still has the rows it measured) and its table from summary.md. The device tool
brings back at most 8 files from $OUT: this writes 4 (summary.json, summary.md, loss.png, training.png);
gpu_check.sh adds its log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastsft from the checkout, installed or not
STATUS = {0: "ok", 124: "timed out", 137: "killed (timeout)", 5: "no tests collected"}


def test_report(path: Path) -> dict:
    """_gpu_report.py's lines: passed count, failures, skip reasons (with counts)."""
    if not path.exists():
        return {}
    out = {"passed": 0, "failed": [], "skipped": {}}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["outcome"] == "passed":
            out["passed"] += 1
        elif rec["outcome"] == "failed":
            out["failed"].append(f"{rec['test']} ({rec['when']}): {rec.get('message', '')}")
        else:
            reason = rec.get("message", "")[:200]
            out["skipped"][reason] = out["skipped"].get(reason, 0) + 1
    return out


def collect(out: Path, work: Path, part: str, rc: int, seconds: float, limit: int, note: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"parts": {}}
    rec = {
        "rc": rc,
        "status": STATUS.get(rc, f"exit {rc}"),
        "seconds": round(seconds, 1),
        "limit_s": limit,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if note:
        rec["note"] = note
    tests = test_report(work / f"{part}.jsonl")
    if tests:
        rec["tests"] = tests
    bench = work / part
    if (bench / "summary.json").exists():
        data = json.loads((bench / "summary.json").read_text())
        rec["bench"] = {k: data.get(k) for k in ("device", "versions", "copy_gbs", "loss", "e2e", "notes")}
        summary.setdefault("device", data.get("device"))
        if (bench / "summary.md").exists():
            rec["table"] = (bench / "summary.md").read_text()
        for png in bench.glob("*.png"):
            shutil.copy(png, out / png.name)
    if (work / f"{part}.json").exists():  # a part's own JSON (setup: versions, the device)
        rec.update(json.loads((work / f"{part}.json").read_text()))
        if rec.get("device"):
            summary["device"] = rec["device"]
    summary["parts"][part] = rec
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return rec


def markdown(summary: dict) -> str:
    lines = [
        "# gpu_check",
        "",
        f"device: {summary.get('device') or 'unknown'}",
        "",
        "| part | status | seconds (limit) | tests passed / failed / skipped |",
        "|---|---|---|---|",
    ]
    for name, rec in summary["parts"].items():
        t = rec.get("tests") or {}
        counts = f"{t['passed']} / {len(t['failed'])} / {sum(t['skipped'].values())}" if t else ""
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} ({rec['limit_s']}) | {counts} |")
    for name, rec in summary["parts"].items():
        extra = []
        if rec.get("note"):
            extra.append(rec["note"])
        if rec.get("versions"):
            extra.append("versions: " + ", ".join(f"{k} {v}" for k, v in rec["versions"].items()))
        t = rec.get("tests") or {}
        extra += [f"FAILED {f}" for f in t.get("failed", [])[:30]]
        extra += [f"skipped x{n}: {r}" for r, n in (t.get("skipped") or {}).items()]
        if rec.get("table"):
            extra.append("\n" + rec["table"].split("\n", 2)[-1].strip())
        if extra:
            lines += ["", f"## {name}", ""] + [x if x.startswith("\n") else f"- {x}" for x in extra]
    return "\n".join(lines) + "\n"


PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "unsloth",
    "unsloth_zoo",
    "liger-kernel",
    "cut-cross-entropy",
    "tomli-w",
    "setuptools",
    "fastsft",
)


def probe(work: Path, stand_in: bool) -> int:
    """setup's last step: what is installed, and the GPU (a stand-in run has none)."""
    from importlib import metadata

    import torch

    import fastsft.kernels  # noqa: F401  (the package and its kernels import)

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "no GPU (stand-in run)" if stand_in else "no GPU"
    rec = {"device": device, "versions": versions, "cuda": torch.version.cuda}
    work.mkdir(parents=True, exist_ok=True)
    (work / "setup.json").write_text(json.dumps(rec) + "\n")
    print(json.dumps(rec))
    missing = [k for k in ("torch", "triton", "transformers", "trl", "peft", "tomli-w") if not versions[k]]
    if missing:
        print(f"missing: {', '.join(missing)}")
    return 0 if (gpu or stand_in) and not missing else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["collect", "probe"])
    ap.add_argument("--stand-in", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--part")
    ap.add_argument("--rc", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    if a.command == "probe":
        return probe(a.work, a.stand_in)
    rec = collect(a.out, a.work, a.part, a.rc, a.seconds, a.limit, a.note)
    t = rec.get("tests") or {}
    print(
        f"== {a.part}: {rec['status']} in {rec['seconds']} s"
        + (f", {t['passed']} passed, {len(t['failed'])} failed" if t else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
