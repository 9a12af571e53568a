"""Shared measuring code: device facts, timing, peak memory, the results folder."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
GPU = torch.cuda.is_available()
QUICK = os.environ.get("FASTSFT_BENCH_QUICK") == "1"


def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} (smoke pass, not a measurement)"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("fastsft", "torch", "triton", "transformers", "trl", "peft", "bitsandbytes", "accelerate",
                "unsloth", "unsloth_zoo", "liger-kernel", "cut-cross-entropy"):  # fmt: skip
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if GPU:
        out["cuda"] = torch.version.cuda
    return out


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
        return GPU and any(r.get("ms") is not None for r in self.loss) or any(
            r.get("tokens_per_s") is not None and r.get("measured") for r in self.e2e
        )

    def summary(self) -> dict:
        return {
            "device": device_name(),
            "date": time.strftime("%Y-%m-%d"),
            "versions": versions(),
            "quick": QUICK,
            **self.extra,
            "loss": self.loss,
            "e2e": self.e2e,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        out = [f"device: {device_name()}", ""]
        if self.loss:
            out += ["| impl | input | vocab | tokens | smoothing | ms | x torch | peak GiB | x torch | achieved | parity |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in self.loss:
                out.append(
                    f"| {r['impl']} | {r['input']} | {r['vocab']} | {r['tokens']} | {r['label_smoothing']} | "
                    f"{_f(r.get('ms'))} | {_f(r.get('speedup_vs_torch'))} | {_f(r.get('peak_mem_gib'), 3)} | "
                    f"{_f(r.get('mem_vs_torch'))} | {r.get('achieved', '')} | {r.get('parity', '')} |"
                )
        if self.e2e:
            out += ["", "| model | backend | seq_len | tokens/s | x transformers | peak GiB | x transformers | first losses |",
                    "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in self.e2e:
                out.append(
                    f"| {r['model']} | {r['backend']} | {r['seq_len']} | {_f(r.get('tokens_per_s'), 0)} | "
                    f"{_f(r.get('speedup_vs_transformers'))} | {_f(r.get('peak_mem_gib'), 2)} | "
                    f"{_f(r.get('mem_vs_transformers'))} | {r.get('first_losses', '')} |"
                )
        if self.notes:
            out += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(out)

    def write(self) -> Path | None:
        env_out = os.environ.get("FASTSFT_BENCH_OUT")
        if env_out:
            folder = Path(env_out)
        elif self.measured:
            slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
            folder = RESULTS_ROOT / f"{time.strftime('%Y-%m-%d')}-{slug}"
        else:
            folder = Path(tempfile.mkdtemp(prefix="fastsft-bench-smoke-"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
        (folder / "summary.md").write_text(f"# fastsft benchmarks, {time.strftime('%Y-%m-%d')}\n\n{self.markdown()}\n")
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
                sel = sorted((r for r in rows if r["impl"] == impl and r["label_smoothing"] == 0.0
                              and r["tokens"] == max(x["tokens"] for x in rows)), key=lambda r: r["vocab"])  # fmt: skip
                if sel:
                    axes[0].plot([r["vocab"] for r in sel], [r["ms"] for r in sel], "o-", label=impl)
                    axes[1].plot([r["vocab"] for r in sel], [r.get("peak_mem_gib") or 0 for r in sel], "o-", label=impl)
            axes[0].set(xlabel="vocabulary", ylabel="fwd+bwd ms", title="loss time")
            axes[1].set(xlabel="vocabulary", ylabel="peak GiB above inputs", title="loss memory")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(folder / "loss.png")
            plt.close(fig)
        rows = [r for r in self.e2e if r.get("tokens_per_s")]
        if rows:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
            for key in sorted({(r["model"], r["backend"]) for r in rows}):
                sel = sorted((r for r in rows if (r["model"], r["backend"]) == key), key=lambda r: r["seq_len"])
                axes[0].plot([r["seq_len"] for r in sel], [r["tokens_per_s"] for r in sel], "o-", label="/".join(key))
                axes[1].plot([r["seq_len"] for r in sel], [r.get("peak_mem_gib") or 0 for r in sel], "o-", label="/".join(key))
            axes[0].set(xlabel="sequence length", ylabel="tokens/s", title="training throughput")
            axes[1].set(xlabel="sequence length", ylabel="peak GiB", title="training memory")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(folder / "training.png")
            plt.close(fig)


def _f(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"
