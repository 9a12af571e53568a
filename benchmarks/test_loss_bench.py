"""Loss benchmark: fastsft's kernels against the stock loss and the other fused losses.

Two groups, each timed forward + backward in bf16 (frozen lm_head, as in LoRA / QLoRA):
- logits in (N, V): fastsft (`fused_cross_entropy`, gradient written over the logits), torch (stock:
  float32 upcast + F.cross_entropy, as transformers does), torch-compile, liger, unsloth;
- hidden states in (N, H) and the lm_head (V, H): fastsft-linear, torch-stock-linear (`hidden @ W.T`,
  `.float()`, F.cross_entropy), torch-linear (F.linear_cross_entropy, chunked options), liger-linear,
  unsloth-fused, cce, trl.

Inputs (`make_inputs`, in _loss_impls.py with the implementations, which _loss_worker.py imports too): W ~ N(0, 1/H) (rows of norm ~1); each hidden state is `SIGMA * noise` plus a
push of length `margin` along its target's lm_head row, margin ~ log V + SIGMA^2/2 + N(0, 2). The other
logits are then ~N(0, SIGMA^2) and the target stands out by about as much as the rest's log-sum-exp:
a peaked softmax like a trained model's (mean loss ~1.4 nats, median target probability ~0.47, ~200
tokens per row above 2^-12), not uniform noise (which would flatter Cut Cross-Entropy's gradient
filtering) and not one-hot (a loss of ~0). 25% of the labels are -100, as prompt tokens are in SFT.
Each row records its float64 loss.

On a GPU: H = 4096, V in {32768, 128256, 151936, 262144}, N in {4096, 16384}, label smoothing 0 and
0.1 (FASTSFT_BENCH_QUICK=1: V = 128256, N = 16384). Without a GPU each implementation that runs on the
CPU runs once at a tiny size (a smoke pass, so the code cannot rot) and its loss is checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402
from _loss_impls import (  # noqa: E402  (sets Unsloth's chunk budget before anything imports it)
    BASELINE,
    DTYPE,
    IGNORED_SHARE,
    IMPLS,
    SIGMA,
    H,
    _importable,
    fastsft_loss,
    inputs_for,
    make_inputs,
    reference_loss,
)

from fastsft.kernels import cross_entropy_reference  # noqa: E402

from _bench import CPU_FULL, GPU, QUICK, busy, copy_bandwidth_gbs, loadavg, peak_gib, time_ms  # noqa: E402

if GPU:
    SIZES = (
        [(16384, 128256)]
        if QUICK
        else [(n, v) for v in (32768, 128256, 151936, 262144) for n in (4096, 16384)]
    )
else:
    SIZES = [(64, 509)]
SMOOTHING = [0.0, 0.1]
PARITY_RTOL = 2e-2  # relative distance of the loss to the float64 definition (bf16 logits round to ~0.4%)

pytestmark = pytest.mark.loss


CASES = [
    pytest.param(impl, n, v, id=f"{impl}-V{v}-N{n}", marks=[getattr(pytest.mark, f"{kind}_in")])
    for n, v in SIZES
    for impl, (kind, _, _) in IMPLS.items()
]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@pytest.mark.parametrize("impl,n,v", CASES)
def test_loss(impl, n, v, results):
    kind, build, on_cpu = IMPLS[impl]
    why = _importable(impl)
    if not GPU and not on_cpu:
        pytest.skip(
            f"{impl}: GPU only (CUDA kernels / torch.compile), not smoke-tested on the CPU; "
            f"{'installed here' if why is None else 'not installed here either'}"
        )
    if why:
        note = f"{impl}: skipped, not installed ({why})"
        if note not in results.notes:
            results.notes.append(note)
        pytest.skip(note)
    if GPU and "copy_gbs" not in results.extra:
        results.extra["copy_gbs"] = round(copy_bandwidth_gbs(), 1)
        results.extra["loss_inputs"] = (
            f"bf16, H={H}; W ~ N(0, 1/H); hidden = {SIGMA} * noise + margin * (target's lm_head row), margin ~ "
            f"log V + {SIGMA**2 / 2} + N(0, 2): non-target logits ~N(0, {SIGMA**2}), a peaked softmax with a mean "
            f"loss ~1.4 nats; {IGNORED_SHARE:.0%} of the labels ignored (-100)"
        )
    h, w, y = inputs_for(n, v)
    supervised = int((y != -100).sum())
    bandwidth = results.extra.get("copy_gbs")
    failures = []
    for eps in SMOOTHING:
        row = {
            "impl": impl,
            "input": kind,
            "vocab": v,
            "tokens": n,
            "supervised_tokens": supervised,
            "hidden": H,
            "label_smoothing": eps,
            "dtype": str(DTYPE).removeprefix("torch."),
        }
        try:
            run = build(h, w, y, eps)
            loss = float(run())
        except NotImplementedError as e:
            results.notes.append(f"{impl} V={v} N={n} smoothing {eps}: skipped ({e})")
            continue
        except ImportError as e:
            pytest.skip(f"{impl}: not installed ({e.name or e})")
        except Exception as e:
            if _is_oom(e):
                results.loss.append({**row, "error": "out of memory"})
                results.notes.append(f"{impl} V={v} N={n} smoothing {eps}: out of memory")
                torch.cuda.empty_cache()
                continue
            raise
        ref = reference_loss(n, v, eps)
        anchor = fastsft_loss(n, v, eps)
        row.update(
            loss=round(loss, 5),
            loss_fp64=round(ref, 5),
            rel_err_fp64=abs(loss - ref) / abs(ref),
            rel_diff_vs_fastsft=abs(loss - anchor) / abs(anchor),
            parity=f"{abs(loss - ref) / abs(ref):.1e}",
        )
        if not math.isfinite(loss) or row["rel_err_fp64"] > PARITY_RTOL:
            failures.append(f"smoothing {eps}: loss {loss} vs float64 {ref} (fastsft {anchor})")
        if GPU:
            try:
                row["ms"] = time_ms(run)
                row["peak_mem_gib"] = peak_gib(run)
            except Exception as e:
                if not _is_oom(e):
                    raise
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            if row.get("ms"):
                s = row["ms"] / 1e3
                if kind == "logits":
                    # the floor of a logits-in loss: read the bf16 logits twice, write the gradient once
                    row["achieved_gbs"] = 6 * n * v / s / 1e9
                    row["achieved"] = f"{row['achieved_gbs']:.0f} GB/s"
                    if bandwidth:
                        row["achieved"] += f" ({row['achieved_gbs'] / bandwidth:.0%} of copy)"
                else:
                    # frozen lm_head: forward matmul + gradient of the hidden states, all N tokens counted
                    row["achieved_tflops"] = 4 * n * H * v / s / 1e12
                    row["achieved"] = f"{row['achieved_tflops']:.0f} TFLOP/s"
        results.loss.append(row)
        del run
    _ratios(results)
    if GPU:
        torch.cuda.empty_cache()
    assert not failures, f"{impl} computes a different loss: " + "; ".join(failures)
    if not GPU:
        pytest.skip("no GPU: smoke pass only (the code ran and its loss matched float64), nothing measured")


def _ratios(results):
    """Time and memory as ratios to the stock loss of the same group and size, measured in this run."""
    base = {}
    for r in results.loss:
        if r["impl"] == BASELINE[r["input"]] and r.get("ms"):
            base[(r["input"], r["vocab"], r["tokens"], r["label_smoothing"], r.get("background"))] = r
    for r in results.loss:
        b = base.get((r["input"], r["vocab"], r["tokens"], r["label_smoothing"], r.get("background")))
        if b and r.get("ms"):
            r["speedup_vs_torch"] = b["ms"] / r["ms"]
            if r.get("peak_mem_gib") is not None and b.get("peak_mem_gib"):
                r["mem_vs_torch"] = r["peak_mem_gib"] / b["peak_mem_gib"]


# ----------------------------------------------------------------------------------------------
# CPU measurements (no GPU here): time as ratios within one child process, memory per row in its own
# ----------------------------------------------------------------------------------------------

WORKER = Path(__file__).with_name("_loss_worker.py")
if CPU_FULL:  # the committed CPU grid (FASTSFT_BENCH_CPU=full): (tokens, vocabulary); the larger vocabulary
    # with half the tokens, so that the slowest peers (torch's chunked loss, TRL) finish in minutes
    CPU_H, CPU_SIZES, CPU_REPS = 1024, ((1024, 32768), (512, 128256)), 3
else:  # CI: one small size, a few minutes
    CPU_H, CPU_SIZES, CPU_REPS = 1024, ((512, 8192),), 3
CPU_IMPLS = [
    "fastsft-linear",
    "fastsft-linear-1mib",
    "torch-stock-linear",
    "torch-linear",
    "torch-linear-compact",
    "trl",
    "cce",
    "liger-linear",
    "fastsft",
    "torch",
]
CPU_ONLY_GPU = {
    "liger-linear": "Liger's kernels are Triton-only (on the CPU they would time the Triton interpreter)"
}
CPU_METHOD = (
    f"bf16 inputs, H={{h}}, N={{n}} tokens ({IGNORED_SHARE:.0%} ignored), frozen lm_head; fastsft on its CPU path "
    "(the PyTorch twin; TRITON_INTERPRET unset in the children). ms: median of {reps} forward + backward runs after "
    "one warm-up, all rows of a size timed in one process, interleaved (A B C, B C A, ...); x torch compares "
    "medians of that same process. peak MiB: peak resident set of one run above the resident set before it "
    "(inputs, logits for logits-in rows), each row in its own process (CI's one-size pass: the rows of a "
    "smoothing one after another in one process), after a warm-up run, with "
    "MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the resident set (only there: timed under it, "
    "every buffer of 64 KiB or more is a fresh mapping, page-faulted in on each use, which adds ~200 us to "
    "each oneDNN matmul's packing buffer and so penalises a loss by its number of matmul calls)."
)


def _child_env(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MALLOC_MMAP_THRESHOLD_")}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if mode == "mem":  # the resident set follows the live tensors (not for timing: see CPU_METHOD)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def _child(args: list, out: Path, timeout: int) -> dict:
    cmd = [sys.executable, str(WORKER), *map(str, args), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(args[0]))
    if out.exists():
        return json.loads(out.read_text())
    tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
    return {"error": f"worker exit {proc.returncode}: {tail[-400:]}"}


def reference_losses_cpu(h, w, y, eps_list) -> dict:
    """The float64 loss (float32-accumulated products of the bf16 inputs, softmax in float64) per smoothing."""
    wf = w.float()
    totals = dict.fromkeys(eps_list, 0.0)
    keep = y != -100
    hk, yk = h.detach()[keep], y[keep]
    for i in range(0, hk.shape[0], 64):
        z = (hk[i : i + 64].float() @ wf.T).double()
        for eps in eps_list:
            totals[eps] += float(
                cross_entropy_reference(z, yk[i : i + 64], label_smoothing=eps, reduction="sum")
            )
        del z
    return {eps: t / max(1, hk.shape[0]) for eps, t in totals.items()}


@pytest.mark.cpu
@pytest.mark.parametrize("n,v", CPU_SIZES, ids=[f"V{v}-N{n}" for n, v in CPU_SIZES])
def test_loss_cpu(n, v, results, tmp_path):
    if GPU:
        pytest.skip("a GPU is here: test_loss measures on it")
    h = CPU_H
    results.extra["cpu_method"] = CPU_METHOD.format(
        h=h, n=" and ".join(str(s[0]) for s in CPU_SIZES), reps=CPU_REPS
    )
    impls = []
    for impl in CPU_IMPLS:
        why = CPU_ONLY_GPU.get(impl) or _importable(impl)
        if why:
            note = f"{impl}: not measured on the CPU ({why})"
            if note not in results.notes:
                results.notes.append(note)
        else:
            impls.append(impl)
    hid, w, y = make_inputs(n, v, h=h, dtype=torch.bfloat16, device="cpu")
    supervised = int((y != -100).sum())
    refs = reference_losses_cpu(hid, w, y, SMOOTHING)
    del hid, w
    failures = []
    for eps in SMOOTHING:
        load0 = loadavg()
        timed = _child(
            ["time", n, v, h, ",".join(impls), eps, CPU_REPS], tmp_path / f"time-{v}-{eps}.json", 3000
        )
        if "error" in timed and isinstance(timed["error"], str):
            pytest.fail(f"V={v} smoothing {eps}: the timing child failed: {timed['error']}")
        rows = []
        if not CPU_FULL:  # CI: every row's memory in one child (the committed grid: a child per row)
            ran = [i for i in impls if "ms" in timed.get(i, {})]
            mems = (
                _child(["mem", n, v, h, ",".join(ran), eps], tmp_path / f"mem-{v}-{eps}.json", 3000)
                if ran
                else {}
            )
        for impl in impls:
            rec = timed.get(impl, {})
            if "skipped" in rec:
                results.notes.append(f"{impl} V={v} N={n} smoothing {eps}: skipped ({rec['skipped']})")
                continue
            row = {
                "impl": impl,
                "input": IMPLS[impl][0],
                "vocab": v,
                "tokens": n,
                "supervised_tokens": supervised,
                "hidden": h,
                "label_smoothing": eps,
                "dtype": "bfloat16",
                "device": "cpu",
            }
            if "error" in rec:
                results.notes.append(f"{impl} V={v} N={n} smoothing {eps}: FAILED ({rec['error']})")
                results.loss.append({**row, "error": rec["error"][:80]})
                failures.append(f"{impl} smoothing {eps}: {rec['error']}")
                continue
            if CPU_FULL:
                mem = _child(["mem", n, v, h, impl, eps], tmp_path / f"mem-{impl}-{v}-{eps}.json", 3000)
                mem = mem.get(impl, mem)
            else:
                mem = mems.get(impl, mems)
            loss, ref = rec["loss"], refs[eps]
            row.update(
                ms=rec["ms"],
                samples_ms=[round(x, 1) for x in rec["samples_ms"]],
                loss=round(loss, 5),
                loss_fp64=round(ref, 5),
                rel_err_fp64=abs(loss - ref) / abs(ref),
                parity=f"{abs(loss - ref) / abs(ref):.1e}",
                loadavg_during=[load0, loadavg()],
            )
            if "peak_mib" in mem:
                row["peak_mem_gib"] = mem["peak_mib"] / 1024
            else:
                results.notes.append(f"{impl} V={v} N={n} smoothing {eps}: memory not measured ({mem})")
            s = rec["ms"] / 1e3
            if row["input"] == "hidden":
                row["achieved_tflops"] = 4 * supervised * h * v / s / 1e12
                row["achieved"] = f"{row['achieved_tflops'] * 1e3:.0f} GFLOP/s"
            if not math.isfinite(loss) or row["rel_err_fp64"] > PARITY_RTOL:
                # fastsft must match; another library's miss is reported (its row stays, marked)
                row["parity"] += " FAIL"
                results.notes.append(
                    f"{impl} V={v} N={n} smoothing {eps}: loss {loss:.5f} is "
                    f"{row['rel_err_fp64']:.1%} from the float64 loss {ref:.5f}"
                )
                if impl.startswith("fastsft"):
                    failures.append(f"{impl} smoothing {eps}: loss {loss} vs float64 {ref}")
            rows.append(row)
        anchor = next((r["loss"] for r in rows if r["impl"] == "fastsft-linear"), None)
        for r in rows:
            if anchor:
                r["rel_diff_vs_fastsft"] = abs(r["loss"] - anchor) / abs(anchor)
        results.loss.extend(rows)
        _ratios(results)
        _lead_note(results, rows, v, n, eps)
        ms = {r["impl"]: r.get("ms") for r in rows}
        if CPU_FULL and ms.get("trl") and ms.get("fastsft-linear") and ms["fastsft-linear"] >= ms["trl"]:
            # the committed grid: fastsft-linear ahead of TRL's chunked head (SFTTrainer's default loss) in time
            failures.append(
                f"smoothing {eps}: fastsft-linear {ms['fastsft-linear']:.0f} ms, TRL {ms['trl']:.0f}"
            )
    assert not failures, "; ".join(failures)


def _lead_note(results, rows, v, n, eps):
    """One line per size: fastsft-linear against every other hidden-in row (fastsft's own variants
    aside), in time and in memory: which peers it leads or ties, and any that beat it, by how much."""
    ours = next((r for r in rows if r["impl"] == "fastsft-linear" and r.get("ms")), None)
    peers = [
        r for r in rows if r["input"] == "hidden" and not r["impl"].startswith("fastsft") and r.get("ms")
    ]
    if not ours or not peers:
        return
    ahead_t = [r["impl"] for r in peers if r["ms"] < ours["ms"]]
    mine = ours.get("peak_mem_gib")
    ahead_m = [
        r["impl"]
        for r in peers
        if mine is not None and r.get("peak_mem_gib") is not None and r["peak_mem_gib"] < mine
    ]
    line = f"V={v} N={n} smoothing {eps}: fastsft-linear vs {len(peers)} peer rows: "
    if not ahead_t and not ahead_m:
        line += "ahead of or equal to every one in time and memory"
    else:
        parts = [
            f"{p} faster ({ours['ms'] / r['ms']:.2f}x our time)"
            for p in ahead_t
            for r in peers
            if r["impl"] == p
        ]
        parts += [
            f"{p} smaller ({mine / r['peak_mem_gib']:.2f}x our memory)"
            for p in ahead_m
            for r in peers
            if r["impl"] == p
        ]
        line += "behind " + "; ".join(parts)
    results.notes.append(line)


# ----------------------------------------------------------------------------------------------
# The CPU loss on a busy machine: the same timing child beside busy processes (a laptop's or a CI
# runner's usual state), fastsft-linear against the stock loss in the same conditions
# ----------------------------------------------------------------------------------------------

BUSY = 2  # background processes, each a spin loop holding a core
# the full grid's sizes (FASTSFT_BENCH_CPU=full), so that each quiet row has its busy twin; CI: one small size
LOADED_SIZES = CPU_SIZES if CPU_FULL else ((512, 8192),)
LOADED_REPS = 7
# fastsft-linear beside busy processes within this factor of the stock loss's time (test_loss_cpu_loaded):
# the collapse it guards against was 5x; on 2 shared cores the ratio of the two medians wanders 0.75-1.35x
# from run to run (CI 2026-12-07: 172 ms to 132), which a bound of 1 would fail by chance.
LOADED_SLACK = 1.5
# the full grid adds TRL's chunked log-prob head (what SFTTrainer's default nll loss runs, TRL >= 1.15)
LOADED_IMPLS = ["fastsft-linear", "torch-stock-linear"] + (
    ["trl", "fastsft-linear-all-threads"] if CPU_FULL else []
)


LOADED_METHOD = (
    f"(+{BUSY} busy processes) rows: bf16, H={{h}}, N={{n}} tokens ({IGNORED_SHARE:.0%} ignored), frozen lm_head, no "
    f"smoothing; {BUSY} background processes each spinning on a core (`while True: pass`) throughout; ms: median "
    "of {reps} forward + backward runs after one warm-up, the rows of a size timed in one child, interleaved; "
    "x torch compares medians of that same child. fastsft-linear-all-threads: the online tiles with every "
    "intra-op thread whatever the load (fastsft before `free_cpu_threads`)."
)


@pytest.mark.cpu
@pytest.mark.parametrize("n,v", LOADED_SIZES, ids=[f"V{v}-N{n}" for n, v in LOADED_SIZES])
def test_loss_cpu_loaded(n, v, results, tmp_path):
    """fastsft-linear does not collapse beside BUSY busy processes: within LOADED_SLACK of the stock
    loss's time (medians of LOADED_REPS interleaved runs in one child; no label smoothing). Before the
    loss shared the cores (spinning OpenMP waits, every thread) it took 1175 ms to the stock loss's 233;
    on an idle machine, at this size, the two are at par in time (0.75-1.2x across runs and machines:
    fastsft-linear's win here is its memory, ~1/16 of the stock loss's), so a bare `ours <= stock` would
    be a coin toss."""
    if GPU:
        pytest.skip("a GPU is here: test_loss measures on it")
    results.extra.setdefault("cpu_method", LOADED_METHOD.format(n=n, h=CPU_H, reps=LOADED_REPS))
    with busy(BUSY):
        load0 = loadavg()
        timed = _child(
            ["time", n, v, CPU_H, ",".join(LOADED_IMPLS), 0.0, LOADED_REPS], tmp_path / "loaded.json", 3000
        )
        load1 = loadavg()
    for impl in LOADED_IMPLS:
        assert "ms" in timed.get(impl, {}), f"{impl}: {timed.get(impl, timed)}"
    rows = [
        {
            "impl": impl,
            "input": "hidden",
            "vocab": v,
            "tokens": n,
            "hidden": CPU_H,
            "label_smoothing": 0.0,
            "dtype": "bfloat16",
            "device": "cpu",
            "background": f"{BUSY} busy processes",
            "ms": timed[impl]["ms"],
            "samples_ms": [round(x, 1) for x in timed[impl]["samples_ms"]],
            "loss": round(timed[impl]["loss"], 5),
            "loadavg_during": [load0, load1],
        }
        for impl in LOADED_IMPLS
    ]
    results.loss.extend(rows)
    _ratios(results)
    ours, stock = timed["fastsft-linear"]["ms"], timed["torch-stock-linear"]["ms"]
    trl = timed.get("trl", {}).get("ms")
    results.notes.append(
        f"V={v} N={n} beside {BUSY} busy processes (load {load0} -> {load1}): fastsft-linear {ours:.0f} ms, "
        f"stock {stock:.0f} ms ({stock / ours:.2f}x)"
        + (f", TRL's head {trl:.0f} ms ({trl / ours:.2f}x)" if trl else "")
    )
    assert abs(timed["fastsft-linear"]["loss"] - timed["torch-stock-linear"]["loss"]) < 2e-2
    if trl:  # the full grid: TRL's chunked head (SFTTrainer's default loss) is the peer to lead busy too
        assert ours < trl, (
            f"beside {BUSY} busy processes TRL's head took {trl:.0f} ms, fastsft-linear {ours:.0f}"
        )
    assert ours <= LOADED_SLACK * stock, (
        f"beside {BUSY} busy processes fastsft-linear took {ours:.0f} ms, more than {LOADED_SLACK}x the stock "
        f"loss's {stock:.0f} ms"
    )
