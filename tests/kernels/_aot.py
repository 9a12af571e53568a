"""Every launch of fastsft's Triton kernels, compiled for real GPUs on a machine without one.

1. Capture: the host functions (`fused_cross_entropy`, `fused_linear_cross_entropy`) run on small CPU
   tensors with the launch of `_ce_kernel` replaced by a recorder (nothing runs): each dtype, option
   set (label smoothing, z-loss, softcap, an ignored row, reduction, in-place backward, gradient to
   the hidden states / the lm_head or none) and vocabulary V in {32000, 32001, 50257, 128256, 262144}.
   The host code chooses the block and warps as it would on a GPU (`interpreting()` says no).
2. Compile: each captured launch goes through the kernel's own `warmup` (Triton's binder specialises
   the arguments exactly as a real launch would: alignment, integers equal to 1, dtypes) under a
   stand-in driver that answers one GPU target, GPUTarget("cuda", cap, 32), for sm_80, sm_86, sm_89,
   sm_90a and sm_120a. Triton's compiler runs its real pipeline to the cubin with its bundled ptxas;
   ptxas's own `-v` report (registers, spill stores / loads, stack frame, static shared memory) is
   read from the log file of that very ptxas call.
3. Check: compiles; 0 spilled bytes; registers x threads within the 64K-register file of one SM;
   shared memory (Triton's dynamic + ptxas's static) within each architecture's per-block limit.

Run in a process where TRITON_INTERPRET is unset (the test does that):
    python tests/kernels/_aot.py [--full] [--json OUT.json] [--md OUT.md]
Without --full a small subset (bf16 and float32, V = 32001 and 128256, sm_90a and sm_120a).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("_aot.py: run without TRITON_INTERPRET=1 (the kernels must be JIT functions, not interpreted)")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fastsft-aot-cache-"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fastsft.kernels import cross_entropy as _ce  # noqa: E402
from fastsft.kernels.cross_entropy import fused_cross_entropy  # noqa: E402
from fastsft.kernels.linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402

ARCHS = {80: "sm_80", 86: "sm_86", 89: "sm_89", 90: "sm_90a", 120: "sm_120a"}
VOCABS = (32000, 32001, 50257, 128256, 262144)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REGISTER_FILE = 65536  # 32-bit registers per SM on every architecture here (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability": 64K registers per multiprocessor, 8.0-12.0)
MAX_REGS_PER_THREAD = 255
# Largest shared memory one block may use (opt-in), bytes. CUDA C++ Programming Guide, table
# "Technical Specifications per Compute Capability", row "Maximum amount of shared memory per thread
# block"; the same figures in NVIDIA's tuning guides: Ampere (8.0: 163 KB, 8.6: 99 KB), Ada (8.9:
# 99 KB), Hopper (9.0: 227 KB), Blackwell (12.0: 99 KB).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}


# ------------------------------------------------------------------------------------------------
# 1. capture
# ------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands for `_ce_kernel` in the host code: `kernel[grid](*args, **kw)` is recorded, not run."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return record


def _options(smoothing, zloss, softcap):
    return dict(label_smoothing=smoothing, lse_square_scale=zloss, softcap=softcap)


def capture(full: bool) -> list[tuple[str, tuple]]:
    """[(case name, (grid, args, kwargs))] for every host-side launch of the grid."""
    dtypes = DTYPES if full else {"fp32": torch.float32, "bf16": torch.bfloat16}
    vocabs = VOCABS if full else (32001, 128256)
    flags = list(itertools.product((0.0, 0.1), (0.0, 1e-4), (None, 30.0)))
    if not full:
        flags = [(0.0, 0.0, None), (0.1, 1e-4, 30.0)]
    rec = _Recorder(_ce._ce_kernel)
    saved = _ce._ce_kernel, _ce.triton_available, _ce.interpreting
    _ce._ce_kernel, _ce.triton_available, _ce.interpreting = rec, (lambda device=None: True), (lambda: False)
    out = []
    try:
        for (dn, dt), V, (eps, z, cap) in itertools.product(dtypes.items(), vocabs, flags):
            opt = _options(eps, z, cap)
            tag = f"eps{eps:g}-z{z:g}-cap{cap or 0:g}"
            labels = torch.tensor([1, -100, V - 1, 0])  # one ignored row
            # logits in: reduction x (no gradient, a fresh gradient buffer, in-place backward)
            for red, grad in itertools.product(("mean", "sum", "none"), ("nograd", "grad", "inplace")):
                if not full and red == "sum":
                    continue
                x = torch.zeros(4, V, dtype=dt, requires_grad=grad != "nograd")
                n = len(rec.launches)
                loss = fused_cross_entropy(
                    x, labels, reduction=red, backend="triton", inplace_backward=grad == "inplace", **opt
                )
                if grad != "nograd":
                    loss.sum().backward()
                out += [(f"ce-{dn}-V{V}-{tag}-{red}-{grad}", launch) for launch in rec.launches[n:]]
            # hidden states in: reduction x which gradients (hidden, hidden + lm_head, none)
            for red, grads in itertools.product(("mean", "none"), ("h", "hw", "nograd")):
                h = torch.zeros(4, 16, dtype=dt, requires_grad="h" in grads)
                w = torch.zeros(V, 16, dtype=dt, requires_grad="w" in grads)
                n = len(rec.launches)
                loss = fused_linear_cross_entropy(h, w, labels, reduction=red, backend="triton", **opt)
                if grads != "nograd":  # a launch the backward makes is captured too
                    loss.sum().backward()
                out += [(f"lce-{dn}-V{V}-{tag}-{red}-{grads}", launch) for launch in rec.launches[n:]]
    finally:
        _ce._ce_kernel, _ce.triton_available, _ce.interpreting = saved
    return out


# ------------------------------------------------------------------------------------------------
# 2. compile under a stand-in driver
# ------------------------------------------------------------------------------------------------


class StandInDriver:
    """Answers what Triton's JIT asks a driver before a launch: the target, a device and a stream."""

    def __init__(self, cap: int):
        self.cap = cap

    def get_current_target(self):
        return GPUTarget("cuda", self.cap, 32)

    def get_current_device(self):
        return self.cap  # one JIT cache per architecture

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        return torch.device("cpu")


class _PtxasLogs:
    """Wraps `subprocess` in Triton's NVIDIA compiler module: keeps the `-v` log of each ptxas call."""

    def __init__(self, real):
        self.real, self.logs = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def run(self, cmd, *args, **kwargs):
        result = self.real.run(cmd, *args, **kwargs)
        log = kwargs.get("stderr")
        if "ptxas" in os.path.basename(str(cmd[0])) and hasattr(log, "name"):
            self.logs.append((list(map(str, cmd)), Path(log.name).read_text()))
        return result


def parse_ptxas(log: str) -> dict:
    def num(pattern, default=0):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else default

    return dict(
        regs=num(r"Used (\d+) registers", None),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
        stack=num(r"(\d+) bytes stack frame"),
        static_smem=num(r"(\d+) bytes smem"),
    )


def ptxas_version(archs) -> str:
    """The bundled ptxas each architecture is assembled with (Triton picks one by capability)."""
    from triton.backends.nvidia.compiler import get_ptxas

    out = {}
    for cap in archs:
        tool = get_ptxas(cap)
        text = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), (V[\d.]+)", text)
        out.setdefault(f"{Path(tool.path).name} {m.group(2) if m else '?'}", []).append(ARCHS[cap])
    return "; ".join(f"{k} ({', '.join(v)})" for k, v in out.items())


def compile_all(launches, archs) -> list[dict]:
    from triton.backends.nvidia import compiler as nv

    logs = _PtxasLogs(nv.subprocess)
    nv.subprocess = logs
    by_hash: dict[tuple, dict] = {}
    rows = []
    try:
        for cap in archs:
            driver.set_active(StandInDriver(cap))
            for case, (grid, args, kwargs) in launches:
                row = dict(
                    case=case, arch=ARCHS[cap], block=kwargs.get("BLOCK"), num_warps=kwargs.get("num_warps")
                )
                n_logs = len(logs.logs)
                t0 = time.perf_counter()
                try:
                    kernel = _ce._ce_kernel.warmup(*args, grid=grid, **kwargs)
                except Exception as e:  # a failed compile is a result, not a crash of the table
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                    rows.append(row)
                    continue
                key = (cap, kernel.hash)
                if key not in by_hash:
                    new = logs.logs[n_logs:]
                    info = parse_ptxas(new[-1][1]) if new else {}
                    info.update(
                        kernel=kernel.hash[:12],
                        shared=int(kernel.metadata.shared),
                        threads=32 * int(kernel.metadata.num_warps),
                        compile_s=round(time.perf_counter() - t0, 2),
                    )
                    by_hash[key] = info
                if isinstance(getattr(kernel, "asm", None), dict):
                    kernel.asm.clear()  # the IR and binaries of 700+ kernels: GBs kept for nothing
                row.update(by_hash[key])
                rows.append(check(row, cap))
    finally:
        nv.subprocess = logs.real
        driver._active = None  # (no real driver here to reset to)
    return rows


# ------------------------------------------------------------------------------------------------
# 3. check
# ------------------------------------------------------------------------------------------------


def check(row: dict, cap: int) -> dict:
    problems = []
    if row.get("regs") is None:
        problems.append("no ptxas report")
    else:
        if row["spill_stores"] or row["spill_loads"]:
            problems.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
        if row["regs"] > MAX_REGS_PER_THREAD or row["regs"] * row["threads"] > REGISTER_FILE:
            problems.append(f"{row['regs']} registers x {row['threads']} threads > {REGISTER_FILE}")
    smem = row.get("shared", 0) + row.get("static_smem", 0)
    if smem > SHARED_LIMIT[cap]:
        problems.append(f"shared {smem} B > {SHARED_LIMIT[cap]} B")
    row.update(ok=not problems, problems="; ".join(problems))
    return row


def versions(archs) -> dict:
    return dict(triton=triton.__version__, ptxas=ptxas_version(archs), torch=torch.__version__)


COLUMNS = (
    "case",
    "arch",
    "block",
    "num_warps",
    "regs",
    "spill_stores",
    "spill_loads",
    "stack",
    "shared",
    "static_smem",
    "kernel",
    "ok",
    "problems",
)


def table_json(rows: list[dict], meta: dict) -> str:
    """Compact: one line per launch x architecture, the columns named once."""
    body = ",\n".join(json.dumps([r.get(c) for c in COLUMNS]) for r in rows)
    return f'{{"meta": {json.dumps(meta)},\n"columns": {json.dumps(COLUMNS)},\n"rows": [\n{body}\n]}}\n'


def markdown(rows: list[dict], meta: dict) -> str:
    """Per architecture and vocabulary the worst case, then one line per distinct compiled kernel."""
    lines = [
        f"# fastsft's Triton kernel compiled ahead of time, {meta['date']}",
        "",
        f"Triton {meta['triton']}; ptxas {meta['ptxas']}. {meta['launches']} host launches (tests/kernels/_aot.py: "
        f"each dtype, option set, reduction, gradient, V) x {len(meta['archs'])} architectures = {len(rows)} "
        f"compiles of {meta['distinct_kernels']} distinct kernels; {sum(r['ok'] for r in rows)} pass (compiles, "
        f"0 spilled bytes, registers x threads <= {REGISTER_FILE}, shared memory within the per-block limit).",
        "",
        "| arch | V | BLOCK x warps | launches | pass | registers (min-max) | spill B (max) | shared B (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(
            (r["arch"], r["case"].split("-")[2], f"{r['block']} x {r['num_warps']}"), []
        ).append(r)
    for (arch, v, cfg), rs in groups.items():
        regs = [r.get("regs") or 0 for r in rs]
        spill = max(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in rs)
        shared = max(r.get("shared", 0) + r.get("static_smem", 0) for r in rs)
        lines.append(
            f"| {arch} | {v[1:]} | {cfg} | {len(rs)} | {sum(r['ok'] for r in rs)} | {min(regs)}-{max(regs)} "
            f"| {spill} | {shared} |"
        )
    lines += [
        "",
        "Distinct kernels (the first case that compiled each):",
        "",
        "| first case | arch | BLOCK | warps | regs | spill B | stack B | shared B | launches | ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    seen: dict[tuple, list] = {}
    for r in rows:
        seen.setdefault((r["arch"], r.get("kernel") or r["case"]), []).append(r)
    for rs in seen.values():
        r = rs[0]
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0) if r.get("regs") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['arch']} | {r['block']} | {r['num_warps']} | {r.get('regs', '-')} | {spill} | "
            f"{r.get('stack', '-')} | {r.get('shared', 0) + r.get('static_smem', 0)} | {len(rs)} | "
            f"{'yes' if r['ok'] else 'NO: ' + (r.get('problems') or r.get('error', ''))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole matrix (default: a small subset)")
    ap.add_argument("--archs", default=None, help="comma-separated capabilities, e.g. 90,120")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--unaligned-max-block",
        type=int,
        default=None,
        help="compile with another block cap for unaligned rows (the record of what it replaced)",
    )
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    archs = (
        [int(a) for a in args.archs.split(",")] if args.archs else (list(ARCHS) if args.full else [90, 120])
    )
    t0 = time.time()
    if args.unaligned_max_block:
        _ce.UNALIGNED_MAX_BLOCK = args.unaligned_max_block
    launches = capture(args.full)
    rows = compile_all(launches, archs)
    meta = dict(
        versions(archs),
        date=time.strftime("%Y-%m-%d"),
        seconds=round(time.time() - t0, 1),
        launches=len(launches),
        archs=[ARCHS[a] for a in archs],
        full=args.full,
    )
    kernels = {(r["arch"], r.get("kernel")) for r in rows}
    meta["distinct_kernels"] = len(kernels)
    meta["unaligned_max_block"] = _ce.UNALIGNED_MAX_BLOCK
    summary = {k: meta[k] for k in ("triton", "ptxas", "launches", "distinct_kernels", "seconds")}
    summary["pass"] = f"{sum(r['ok'] for r in rows)}/{len(rows)}"
    summary["max_regs"] = {
        a: max((r.get("regs") or 0) for r in rows if r["arch"] == a) for a in meta["archs"]
    }
    print(json.dumps(summary))
    for r in rows:
        if not r["ok"]:
            print("FAIL", r["case"], r["arch"], r.get("problems") or r.get("error"))
    if args.json:
        args.json.write_text(table_json(rows, meta))
    if args.md:
        args.md.write_text(markdown(rows, meta))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
