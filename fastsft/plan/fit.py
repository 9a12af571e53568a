"""`[train] fit = "auto"`: a run that would not fit the GPU changes what costs least, never the maths.

`decide(setup, seq_len, budget, levers)` walks the exact changes in order of cost, simulating one step
(`device_peak`) after each, and stops at the first that fits:

1. what costs no time: the levers of `FREE` (the allocator's expandable segments; the frozen float32
   embeddings and lm_head of a k-bit model stored in 16 bits). Both are on by default since the fit
   issue (#35); a recipe that turned them off gets them back here first.
2. gradient checkpointing, when the recipe turned it off (~30% more compute).
3. the other levers of the table, in its order: offloaded checkpoints (a host copy per layer that
   overlaps the next layers' work), then the tiled MLP's shard count, doubled
   from 2 up to the table's value (each doubling more kernel launches of a smaller shard), then the
   tiled decoder layer's tile count, 2 to 16 (kept only where it lowers the peak).
4. a smaller per-device batch with more gradient accumulation (the same effective batch and, with the
   loss summed over the accumulated tokens, the same losses): last, since a smaller batch under-fills
   the GPU and costs the most time.

The order is by time cost first, and the plan's savings agree with it (benchmarks/results/2026-12-07-fit/
fit.md, the shipped Llama-3.1-8B QLoRA recipe at 65,536 tokens, batch 2, simulated): offload saves 61.0
GiB (every layer's checkpoint leaves the GPU), the tiled MLP at 8 shards 39.5 GiB more (the MLP's wide
intermediates), batch 1 a further 13.8 GiB (134.3 -> 20.0 GiB in all). The two free levers are on by
default, so the shipped recipe starts with them. No benchmark here times the levers on a GPU yet; the
time costs are their mechanisms' (a host copy that overlaps compute, more and smaller launches, an
under-filled batch), which is why the batch comes last although it is exact.

`max_length`: the longest length that fits a setup; `compare`: the plan against
`torch.cuda.max_memory_reserved()` after the first optimizer steps (`callback`).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace

from .device import CUDA_CONTEXT, MAX_LENGTH, GiB, allocator_rounding
from .simulate import Setup, simulate

MODES = ("auto", "warn", "off")
# Setup fields of the levers that cost no time (the allocator's setting; a dtype of frozen weights)
FREE = ("expandable_segments", "frozen16")
# [train] key of each Setup field fit may change
KEYS = {
    "expandable_segments": "expandable_segments",
    "frozen16": "frozen_16bit",
    "offload_checkpoints": "offload_checkpoints",
    "tiled_mlp": "tiled_mlp",
    "tiled_layer": "tiled_layer",
    "gradient_checkpointing": "gradient_checkpointing",
    "batch_size": "per_device_train_batch_size",
}
WHY = {
    "expandable_segments": "costs no time: the allocator's segments grow in place (less fragmentation)",
    "frozen16": "costs no time: frozen embeddings and lm_head in 16 bits, the values they hold",
    "gradient_checkpointing": "activations recomputed in backward instead of kept (~30% more compute)",
    "offload_checkpoints": "each layer's checkpoint waits in host memory (a copy that overlaps compute)",
    "tiled_mlp": "the MLP runs over sequence shards (more, smaller kernel launches)",
    "tiled_layer": "each decoder layer's per-token work runs over sequence tiles, attention alone over the "
    "whole sequence (more, smaller kernel launches; 1.00x the tokens/s on the CPU)",
    "batch_size": "fewer sequences per forward, more accumulation: the same effective batch and losses",
}
OVER_PLAN = 1.05  # reality above the plan by more than 5%: a warning
WALK = 8  # max_length's `tol` steps from its linear guess before it brackets and bisects


_PEAKS: dict = {}  # (the setup's fields, seq_len) -> (setup, result): fit's, plan's and ladder's steps shared
_REPORT: list = []  # whom each simulated step is told to (`reporting`)


@contextlib.contextmanager
def reporting(report):
    """Inside, `report(line)` hears of each step simulated (not those already simulated): one line before
    it (a tiled 8B step takes ~30-90 s on a small CPU, and a length search several), one after it."""
    _REPORT.append(report)
    try:
        yield
    finally:
        _REPORT.pop()


def _levers(setup: Setup) -> str:
    on = [
        f"{KEYS[k]}={json.dumps(getattr(setup, k))}" for k in KEYS if k != "batch_size" and getattr(setup, k)
    ]
    return f"batch {setup.batch_size}" + (", " + ", ".join(on) if on else "")


def _key(setup: Setup, seq_len: int) -> tuple:
    return tuple(id(v) if f in ("config", "lora") else v for f, v in vars(setup).items()) + (seq_len,)


def device_peak(setup: Setup, seq_len: int):
    """(the GPU memory one step at `seq_len` needs: the caching allocator's peak reserved segments + the
    CUDA context, the Peak). Reserved, not allocated: it is what the GPU gives out (nvidia-smi), and what
    Unsloth's table measures (its notebooks report `torch.cuda.max_memory_reserved()`). The same setup
    (a `replace` of it with equal fields) at the same length is simulated once."""
    key = _key(setup, seq_len)
    hit = _PEAKS.get(key)
    if hit is not None and hit[0].config is setup.config and hit[0].lora is setup.lora:
        return hit[1]
    report = _REPORT[-1] if _REPORT else None
    if report is not None:
        report(f"plan: simulating one step of {seq_len:,} tokens ({_levers(setup)})")
        start = time.monotonic()
    p = simulate(setup, seq_len, rounding=allocator_rounding)
    if report is not None:
        report(
            f"plan: {seq_len:,} tokens need {(p.reserved_bytes + CUDA_CONTEXT) / GiB:.2f} GiB "
            f"({time.monotonic() - start:.0f} s)"
        )
    if len(_PEAKS) >= 64:
        _PEAKS.pop(next(iter(_PEAKS)))
    _PEAKS[key] = (setup, (p.reserved_bytes + CUDA_CONTEXT, p))  # the setup kept: its ids stay its own
    return _PEAKS[key][1]


def max_length(
    setup: Setup,
    budget: int,
    *,
    cache: dict | None = None,
    lo: int = 64,
    tol: float = 0.005,
    limit: int = MAX_LENGTH,
) -> int:
    """The longest sequence (at the setup's batch size) whose step fits `budget` bytes, to `tol` (0.5%):
    0 if not even `lo` fits. The need grows almost linearly with the length, so a line through two
    simulated steps (8,192 and 65,536 tokens) gives the guess, and simulated steps walk from it in
    `tol` steps until one fits and the next does not (2-3 simulations a budget; a guess more than WALK
    steps off is bracketed and bisected). `cache` {length: bytes}
    may be shared by the calls for one setup (several GPU sizes). The search stops at `limit`
    (data.max_length's bound): what memory allows, not the model's context (`plan` puts the two side by side)."""
    cache = {} if cache is None else cache

    def need(t: int) -> int:
        if t not in cache:
            cache[t] = device_peak(setup, t)[0]
        return cache[t]

    if need(lo) > budget:
        return 0
    if need(limit) <= budget:  # the search's bound: a huge budget simulated lengths whose sizes overflow
        return limit
    a, b = 8192, 65536
    slope = (need(b) - need(a)) / (b - a)
    t = min(limit - 1, max(lo, int(a + (budget - need(a)) / slope)) if slope > 0 else b)

    def up(x: int) -> int:
        return max(x + 1, int(x * (1 + tol)))

    def down(x: int) -> int:
        return max(lo, min(x - 1, int(x / (1 + tol))))

    # walk from the guess in `tol` steps (a linear need: 2-3 steps); a guess far off (a small model, whose
    # need is mostly constant) brackets by doubling / halving instead, then bisects to `tol`
    for _ in range(WALK):
        if need(t) <= budget:
            if need(up(t)) > budget:
                return t
            t = up(t)
        else:
            if t <= lo:
                return lo
            t = down(t)
    if need(t) <= budget:
        good, bad = t, min(2 * t, limit)
        while need(bad) <= budget:  # need(limit) > budget: ends at `limit` at the latest
            good, bad = bad, min(2 * bad, limit)
    else:
        good, bad = max(lo, t // 2), t
        while need(good) > budget:
            good, bad = max(lo, good // 2), good
    while bad > up(good):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if need(mid) <= budget else (good, mid)
    return good if need(up(good)) > budget or up(good) >= bad else up(good)


def _applies(setup: Setup, name: str) -> bool:
    """Whether a lever changes anything for this setup (16-bit frozen weights: a k-bit model under mixed
    precision; offloaded checkpoints: checkpointing on)."""
    if name == "frozen16":
        return setup.load_in_4bit and setup.mixed_precision and setup.method != "full"
    if name == "offload_checkpoints":
        return setup.gradient_checkpointing
    return True


def steps(setup: Setup, levers) -> list[tuple[dict, str]]:
    """The changes `decide` tries, cumulatively, in order: ({Setup field: value}, why). `levers` is
    plan.LEVER_ORDER ((field, value) in order of cost): a lever added there is tried here too."""
    out = []
    free = {k: v for k, v in levers if k in FREE and getattr(setup, k) != v and _applies(setup, k)}
    if free:
        out.append((free, "; ".join(WHY[k] for k in free)))
    if not setup.gradient_checkpointing:
        out.append(({"gradient_checkpointing": True}, WHY["gradient_checkpointing"]))
    cur = replace(setup, gradient_checkpointing=True)
    for k, v in levers:
        if k in FREE or getattr(cur, k) == v or not _applies(cur, k):
            continue
        if isinstance(v, bool):
            out.append(({k: v}, WHY.get(k, "an exact memory lever")))
        else:  # a count (tiled MLP shards, layer tiles): doubled from 2 up to the table's value
            n = 2
            unit = "tiles" if k == "tiled_layer" else "shards"
            while n <= v:
                if n > (getattr(cur, k) or 0):
                    out.append(({k: n}, WHY.get(k, "an exact memory lever") + f" ({n} {unit})"))
                n *= 2
    b = setup.batch_size
    for nb in sorted((d for d in range(1, b) if b % d == 0), reverse=True):
        out.append(({"batch_size": nb}, WHY["batch_size"]))
    return out


@dataclass
class Fit:
    """`decide`'s answer: the setup it chose and how it got there."""

    seq_len: int
    budget: int
    peak_as_written: int
    peak: int
    setup: Setup
    changes: list = field(default_factory=list)  # {"key", "from", "to", "why", "peak_bytes"}
    accumulation: int = 1  # gradient_accumulation_steps after the changes
    weights: int = 0  # bytes the frozen weights alone hold (and the CUDA context)
    max_length: int | None = None  # when nothing fits: the longest length that fits with every change

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def _batch_changed(self) -> bool:
        return any(c["key"] == "train.per_device_train_batch_size" for c in self.changes)

    def overrides(self) -> list[str]:
        """The changes as `--set` items (`recipe.with_overrides`)."""
        out = [f"{c['key']}={json.dumps(c['to'])}" for c in self.changes]
        if self._batch_changed():
            out.append(f"train.gradient_accumulation_steps={self.accumulation}")
        return out

    def as_dict(self) -> dict:
        """run.json's and `fastsft plan --json`'s `fit`."""
        return {
            "seq_len": self.seq_len,
            "budget_gib": round(self.budget / GiB, 2),
            "planned_peak_gib_as_written": round(self.peak_as_written / GiB, 2),
            "planned_peak_gib": round(self.peak / GiB, 2),
            "margin_gib": round((self.budget - self.peak) / GiB, 2),
            "fits": self.fits,
            "changes": [
                {
                    **{k: v for k, v in c.items() if k != "peak_bytes"},
                    "peak_gib": round(c["peak_bytes"] / GiB, 2),
                }
                for c in self.changes
            ],
            **({"gradient_accumulation_steps": self.accumulation} if self._batch_changed() else {}),
            **({"max_length_that_fits": self.max_length} if self.max_length is not None else {}),
        }

    def lines(self) -> list[str]:
        """What `run` prints: one line per change, then the planned peak."""
        out = [
            f"fit: {c['key']} = {json.dumps(c['to'])} (was {json.dumps(c['from'])}): {c['why']}; planned peak "
            f"{c['peak_bytes'] / GiB:.2f} GiB"
            for c in self.changes
        ]
        if self._batch_changed():
            out.append(
                f"fit: train.gradient_accumulation_steps = {self.accumulation} (the same effective batch)"
            )
        verb = "fits" if self.fits else "does NOT fit"
        out.append(
            f"fit: one step of {self.seq_len:,} tokens peaks at {self.peak / GiB:.2f} GiB, {verb} in "
            f"{self.budget / GiB:.2f} GiB (margin {(self.budget - self.peak) / GiB:+.2f} GiB)"
            + ("" if self.changes else ": nothing to change")
        )
        return out

    def nothing_fits(self, max_length_now: int) -> str:
        """The one paragraph a run stops with, before loading weights, when nothing fits."""
        keys = " ".join(o for o in self.overrides())
        if self.max_length == 0:
            return (
                f"the GPU has {self.budget / GiB:.2f} GiB free, and the model's weights alone (with the CUDA "
                f"context) take {self.weights / GiB:.2f} GiB: no memory lever and no max_length makes it fit; "
                "nothing was loaded. Use a GPU with more free memory, or a smaller or 4-bit model "
                "(model.load_in_4bit = true)."
            )
        return (
            f"data.max_length = {max_length_now:,}: one training step needs {self.peak / GiB:.2f} GiB even "
            f"with every exact memory lever ({keys}), more than the GPU's {self.budget / GiB:.2f} GiB free; "
            f"nothing was loaded. The longest max_length that fits with every lever is {self.max_length:,}: "
            f'set data.max_length = {self.max_length} (fit = "auto" sets the levers itself; by hand: --set '
            f"data.max_length={self.max_length} {keys}), or use a GPU with more free memory."
        )


def decide(setup: Setup, seq_len: int, budget: int, levers, *, accumulation: int = 1, longest=True) -> Fit:
    """The first configuration along `steps` whose simulated step fits `budget` bytes (the setup as
    written when it fits). When none does, `max_length` is the longest length that fits with every
    change (with `longest`; 0 when the weights alone do not fit)."""
    peak, p = device_peak(setup, seq_len)
    fit = Fit(seq_len, budget, peak, peak, setup, accumulation=accumulation)
    fit.weights = p.parts.get("weights", 0) + CUDA_CONTEXT
    cur, batch = setup, setup.batch_size
    for change, why in steps(setup, levers):
        if fit.fits:
            break
        peak = device_peak(replace(cur, **change), seq_len)[0]
        if "tiled_layer" in change and peak >= fit.peak:
            continue  # layer tiles that do not lower the peak (a small model, a short length): not taken
        cur = replace(cur, **change)
        fit.peak = peak
        fit.setup = cur
        for k, v in change.items():
            fit.changes = [c for c in fit.changes if c["key"] != f"train.{KEYS[k]}"]  # a count raised again
            was = getattr(setup, k)
            fit.changes.append(
                {"key": f"train.{KEYS[k]}", "from": was, "to": v, "why": why, "peak_bytes": fit.peak}
            )
        if "batch_size" in change:
            fit.accumulation = accumulation * batch // change["batch_size"]
    if not fit.fits and longest:
        fit.max_length = 0 if fit.weights > budget else max_length(fit.setup, budget)
    return fit


def every_change(setup: Setup, levers) -> Setup:
    """The setup with every change of `steps` applied (every lever, batch 1)."""
    for change, _why in steps(setup, levers):
        setup = replace(setup, **change)
    return setup


def as_sets(setup: Setup, changed: Setup) -> list[str]:
    """The `--set` items that turn `setup` into `changed` (a batch change keeps the effective batch:
    named with gradient accumulation in words, since the recipe's value is not known here)."""
    return [
        f"--set train.{KEYS[k]}={json.dumps(getattr(changed, k))}"
        for k in KEYS
        if getattr(changed, k) != getattr(setup, k)
    ]


def ladder(setup: Setup, seq_len: int, levers) -> list[dict]:
    """What each change of `steps` saves, cumulatively (for `fastsft plan`): [{"set", "peak_bytes",
    "saves_bytes"}], the first row the setup as written. A count's intermediate steps (tiled MLP 2, 4)
    are left out: one row per key, at its last value."""
    peak = device_peak(setup, seq_len)[0]
    rows = [{"set": "as written", "peak_bytes": peak, "saves_bytes": 0}]
    cur = setup
    todo = steps(setup, levers)
    todo = [s for i, s in enumerate(todo) if i + 1 == len(todo) or set(todo[i + 1][0]) != set(s[0])]
    for change, _why in todo:
        cur = replace(cur, **change)
        now = device_peak(cur, seq_len)[0]
        label = " ".join(f"train.{KEYS[k]}={json.dumps(v)}" for k, v in change.items())
        rows.append({"set": label, "peak_bytes": now, "saves_bytes": peak - now})
        peak = now
    return rows


def summary(fit: dict) -> str:
    """One line for `fastsft plan`: what fit = "auto" would change (a `Fit.as_dict()`)."""
    if fit.get("weights_alone_gib"):
        return (
            f"the weights alone (with the CUDA context) take {fit['weights_alone_gib']:.2f} GiB, more than "
            f"the {fit['budget_gib']:.2f} GiB: no lever and no max_length fits; a run stops before loading"
        )
    sets = [f"{c['key']}={json.dumps(c['to'])}" for c in fit["changes"]]
    if "gradient_accumulation_steps" in fit:
        sets.append(f"train.gradient_accumulation_steps={fit['gradient_accumulation_steps']}")
    if not fit["fits"]:
        return (
            f"nothing fits even with every lever ({fit['planned_peak_gib']:.2f} GiB): a run stops before "
            "loading, naming the longest max_length that fits (--max-length finds it)"
        )
    if not sets:
        return (
            f"nothing to change (peak {fit['planned_peak_gib']:.2f} GiB, margin {fit['margin_gib']:.2f} GiB)"
        )
    return (
        f"a run would set {' '.join(sets)} (peak {fit['planned_peak_gib']:.2f} GiB, margin "
        f"{fit['margin_gib']:.2f} GiB)"
    )


def compare(planned_reserved: int, measured_reserved: int) -> dict:
    """The plan's reserved peak (without the CUDA context, which the allocator does not count) beside
    torch.cuda.max_memory_reserved() after the first optimizer steps; a warning above OVER_PLAN."""
    ratio = measured_reserved / planned_reserved if planned_reserved > 0 else None
    out = {
        "planned_reserved_gib": round(planned_reserved / GiB, 3),
        "measured_reserved_gib": round(measured_reserved / GiB, 3),
        "measured_over_planned": None if ratio is None else round(ratio, 3),
    }
    if ratio is not None and ratio > OVER_PLAN:
        out["warning"] = (
            f"the first steps reserved {measured_reserved / GiB:.2f} GiB, {100 * (ratio - 1):.0f}% above the "
            f"plan's {planned_reserved / GiB:.2f} GiB: a longer batch later in the run may run out of memory; "
            "lower data.max_length or set the levers by hand (fastsft plan RECIPE shows them)"
        )
    return out


def measured_reserved() -> int | None:
    """torch.cuda.max_memory_reserved() on a CUDA device (None elsewhere: nothing to compare)."""
    import torch

    return torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None


def callback(planned_reserved: int, record, *, after_steps: int = 2):
    """A TrainerCallback that, after `after_steps` optimizer steps (or at the end of a shorter run),
    calls `record(compare(planned_reserved, measured_reserved()))` once (not at all without a measure)."""
    from transformers import TrainerCallback

    class _PlanAgainstReal(TrainerCallback):
        done = False

        def _once(self):
            if not self.done:
                self.done = True
                real = measured_reserved()
                if real is not None:
                    record(compare(planned_reserved, real))

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= after_steps:
                self._once()

        def on_train_end(self, args, state, control, **kw):
            if state.global_step > 0:
                self._once()

    return _PlanAgainstReal()


__all__ = [
    "MODES",
    "FREE",
    "KEYS",
    "Fit",
    "decide",
    "steps",
    "ladder",
    "summary",
    "compare",
    "callback",
    "measured_reserved",
    "device_peak",
    "max_length",
    "every_change",
    "as_sets",
    "reporting",
]
