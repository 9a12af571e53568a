"""Shared measuring code: device facts, timing, peak memory, the results folder."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastsft import machine as fastsft_machine
from fastsft.machine import cpu_model

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
SCRATCH = RESULTS_ROOT / "scratch"  # git-ignored: where figures go unless asked to update committed ones
GPU = torch.cuda.is_available()
QUICK = os.environ.get("FASTSFT_BENCH_QUICK") == "1"
# FASTSFT_BENCH_CPU=full: the CPU grid whose results are committed (benchmarks/results/<date>-cpu-<model>/);
# without it a CPU run measures one small size (CI) and writes to a temporary folder
CPU_FULL = not GPU and os.environ.get("FASTSFT_BENCH_CPU") == "full"


def results_folder(name: str) -> Path:
    """The one place that decides where a benchmark writes its figures (folder `name`, e.g. "context" or
    "cpu-amd-epyc"), so that `pytest benchmarks` never rewrites committed files:
    FASTSFT_BENCH_OUT=DIR: DIR itself (benchmarks/gpu_check.sh); FASTSFT_BENCH_RESULTS=DIR: DIR/name;
    FASTSFT_BENCH_UPDATE=1: a new dated folder to commit, benchmarks/results/<date>-<name>/; otherwise
    benchmarks/results/scratch/<name>/ (git-ignored, replaced by the next run)."""
    if os.environ.get("FASTSFT_BENCH_OUT"):
        return Path(os.environ["FASTSFT_BENCH_OUT"])
    if os.environ.get("FASTSFT_BENCH_RESULTS"):
        return Path(os.environ["FASTSFT_BENCH_RESULTS"]) / name
    if os.environ.get("FASTSFT_BENCH_UPDATE") == "1":
        return RESULTS_ROOT / f"{time.strftime('%Y-%m-%d')}-{name}"
    return SCRATCH / name


def machine() -> dict:
    """The machine the figures come from (CPU runs: model, cores, memory; GPU runs add the device)."""
    out = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        out["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if GPU:
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextmanager
def busy(n: int | None = None):
    """`n` processes (default: one per core) that each keep a core busy (`while True: pass`) for the
    `with` block: the benchmarks' "beside other work"."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n or os.cpu_count() or 2)
    ]
    try:
        time.sleep(1.0)  # let the scheduler see them
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name(0)
    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


def versions() -> dict:
    """fastsft's version report, with the packages the benchmarks compare against."""
    return fastsft_machine.versions(extra=("unsloth_zoo", "liger-kernel", "cut-cross-entropy"))


def time_ms(fn, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of `fn()` in ms: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_gib(fn) -> float | None:
    """Peak CUDA memory of one `fn()` above what was allocated before it (the inputs)."""
    if not GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / s), measured in this run."""
    if not GPU:
        return None
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() / (ms / 1e3) / 1e9


@dataclass
class Results:
    loss: list[dict] = field(default_factory=list)
    e2e: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """At least one real figure was taken on a GPU, or on the CPU with FASTSFT_BENCH_CPU=full (only then
        does benchmarks/results/ receive them)."""
        loss = any(r.get("ms") is not None for r in self.loss)
        e2e = any(r.get("measured") and (r.get("tokens_per_s") or r.get("longest_fitting")) for r in self.e2e)
        return (GPU or CPU_FULL) and (loss or e2e)

    def summary(self) -> dict:
        return {
            "device": device_name(),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "versions": versions(),
            "quick": QUICK,
            **self.extra,
            "loss": self.loss,
            "e2e": self.e2e,
            "notes": self.notes,
        }

    def merge_previous(self, path: Path) -> None:
        """Keep the rows an earlier session of the same day and device wrote there (e.g. `-m loss`, then
        `-m e2e`): a row measured again in this session replaces its old one."""
        if not path.exists():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if old.get("device") != device_name():
            return

        def merge(mine: list[dict], theirs: list[dict], key) -> list[dict]:
            seen = {key(r) for r in mine}
            return [r for r in theirs if key(r) not in seen] + mine

        self.loss[:] = merge(
            self.loss,
            old.get("loss", []),
            lambda r: (
                r.get("impl"),
                r.get("vocab"),
                r.get("tokens"),
                r.get("label_smoothing"),
                r.get("background"),
            ),
        )
        self.e2e[:] = merge(
            self.e2e,
            old.get("e2e", []),
            lambda r: (
                r.get("model"),
                r.get("backend"),
                r.get("seq_len"),
                r.get("longest_fitting"),
                r.get("background"),
            ),
        )
        self.notes[:] = [n for n in old.get("notes", []) if n not in self.notes] + self.notes
        for k, v in old.items():
            if k not in ("device", "machine", "date", "versions", "quick", "loss", "e2e", "notes"):
                self.extra.setdefault(k, v)

    def markdown(self) -> str:
        out = [f"device: {device_name()}"]
        if self.extra.get("copy_gbs"):
            out.append(f"device copy bandwidth (read + write, this run): {self.extra['copy_gbs']:.0f} GB/s")
        if self.extra.get("loss_inputs"):
            out.append(f"loss inputs: {self.extra['loss_inputs']}")
        if self.extra.get("cpu_method"):
            out.append(f"CPU method: {self.extra['cpu_method']}")
        if self.extra.get("loadavg_start"):
            out.append(
                f"load average (1, 5, 15 min) at the start: {self.extra['loadavg_start']}, at the end: "
                f"{self.extra.get('loadavg_end')} (other work shared the machine: compare ratios, not ms)"
            )
        out.append("")
        if self.loss:
            out += [
                "Loss, forward + backward (x torch: the stock loss of the same input group, this run; >1 is better "
                "for time, <1 for memory; parity: relative distance to the float64 loss)",
                "",
                "| impl | input | vocab | tokens | smoothing | ms | x torch | peak MiB | x torch | achieved | loss | "
                "parity | vs fastsft |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in self.loss:
                impl = r["impl"] + (f" (+{r['background']})" if r.get("background") else "")
                out.append(
                    f"| {impl} | {r['input']} | {r['vocab']} | {r['tokens']} | {r['label_smoothing']} | "
                    f"{_f(r.get('ms'), 1)} | {_f(r.get('speedup_vs_torch'))} | {_mib(r.get('peak_mem_gib'))} | "
                    f"{_f(r.get('mem_vs_torch'))} | {r.get('achieved', r.get('error', ''))} | {_f(r.get('loss'), 4)} | "
                    f"{r.get('parity', '')} | {_e(r.get('rel_diff_vs_fastsft'))} |"
                )
        runs = [r for r in self.e2e if not r.get("longest_fitting")]
        if runs:
            kinds = sorted({r.get("base", "NF4 (QLoRA)") for r in runs})
            peak = "peak GiB" if GPU else "peak RSS GiB"
            out += [
                "",
                f"Training, base {' / '.join(kinds)} (x transformers: the stock row of the same model and length, "
                "this run, each row in its own process)",
                "",
                f"| model | backend | seq_len | tokens/s | x transformers | {peak} | x transformers | first losses |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in runs:
                backend = r["backend"] + (f" (+{r['background']})" if r.get("background") else "")
                out.append(
                    f"| {r['model']} | {backend} | {r['seq_len']} | {_f(r.get('tokens_per_s'), 0)} | "
                    f"{_f(r.get('speedup_vs_transformers'))} | {_f(r.get('peak_mem_gib'), 2)} | "
                    f"{_f(r.get('mem_vs_transformers'))} | {r.get('first_losses', '')} |"
                )
        fits = [r for r in self.e2e if r.get("longest_fitting")]
        if fits:
            out += ["", "| model | backend | longest sequence in 24 GiB | stopped by |", "|---|---|---|---|"]
            out += [
                f"| {r['model']} | {r['backend']} | {r['seq_len']} | {r.get('stopped_by') or ''} |"
                for r in fits
            ]
        if self.notes:
            out += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(out)

    def write(self) -> Path | None:
        """summary.json, summary.md and the plots in `results_folder(...)`: a smoke pass (nothing measured
        on a GPU or the full CPU grid) always in scratch; earlier rows of the folder are kept only where
        figures are gathered on purpose (FASTSFT_BENCH_OUT, FASTSFT_BENCH_UPDATE=1, FASTSFT_BENCH_RESULTS)."""
        name = device_name() if GPU else f"cpu {cpu_model()}"
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        folder = (
            results_folder(slug)
            if self.measured or os.environ.get("FASTSFT_BENCH_OUT")
            else SCRATCH / "smoke"
        )
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_relative_to(SCRATCH):
            self.merge_previous(folder / "summary.json")
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
        (folder / "summary.md").write_text(
            f"# fastsft benchmarks, {time.strftime('%Y-%m-%d')}\n\n{self.markdown()}\n"
        )
        self.plot(folder)
        return folder

    def plot(self, folder: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.loss if r.get("ms") is not None]
        if rows:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
            for impl in sorted({r["impl"] for r in rows}):
                sel = sorted(
                    (
                        r
                        for r in rows
                        if r["impl"] == impl
                        and r["label_smoothing"] == 0.0
                        and r["tokens"] == max(x["tokens"] for x in rows)
                    ),
                    key=lambda r: r["vocab"],
                )
                if sel:
                    style = "o-" if sel[0]["input"] == "hidden" else "s--"
                    axes[0].plot([r["vocab"] for r in sel], [r["ms"] for r in sel], style, label=impl)
                    axes[1].plot(
                        [r["vocab"] for r in sel],
                        [_nan(r.get("peak_mem_gib")) for r in sel],
                        style,
                        label=impl,
                    )
            n = max(x["tokens"] for x in rows)
            axes[0].set(
                xlabel="vocabulary", ylabel="fwd+bwd ms", title=f"loss time, {n} tokens, no smoothing"
            )
            axes[1].set(
                xlabel="vocabulary", ylabel="peak GiB above inputs", title="loss memory", yscale="log"
            )
            axes[0].set(yscale="log")
            fig.suptitle(device_name(), fontsize=9)
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(folder / "loss.png")
            plt.close(fig)
        rows = [r for r in self.e2e if r.get("tokens_per_s") and not r.get("longest_fitting")]
        if rows:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
            for key in sorted({(r["model"], r["backend"]) for r in rows}):
                sel = sorted(
                    (r for r in rows if (r["model"], r["backend"]) == key), key=lambda r: r["seq_len"]
                )
                axes[0].plot(
                    [r["seq_len"] for r in sel], [r["tokens_per_s"] for r in sel], "o-", label="/".join(key)
                )
                axes[1].plot(
                    [r["seq_len"] for r in sel],
                    [_nan(r.get("peak_mem_gib")) for r in sel],
                    "o-",
                    label="/".join(key),
                )
            axes[0].set(
                xlabel="sequence length", ylabel="tokens/s", title="training throughput", yscale="log"
            )
            axes[1].set(xlabel="sequence length", ylabel="peak GiB", title="training memory")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(folder / "training.png")
            plt.close(fig)


def _f(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _mib(gib) -> str:
    return "" if gib is None else f"{gib * 1024:.1f}"


def _nan(x) -> float:
    return float("nan") if x is None else x


def _e(x) -> str:
    return "" if x is None else f"{x:.1e}"
