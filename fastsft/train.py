"""One fine-tuning run, top to bottom: recipe -> model -> data -> loss -> SFTTrainer -> run directory.

TRL owns the training loop; this module configures it (`sft_config`), routes its loss through
fastsft's kernels (`FastSFTTrainer.compute_loss`) and adds what TRL lacks: progress with tokens/s,
ETA and memory, metrics.jsonl, the report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import backends, report
from .files import WriteFailed, apply_umask, is_write_error, make_dir, write_text
from .rundir import ADAPTER, METRICS, RECIPE, RUN_JSON, RunDir, default_path


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


# ----------------------------------------------------------------------------------------------
# Measurements shared by the progress line and metrics.jsonl
# ----------------------------------------------------------------------------------------------


def peak_memory_gib() -> tuple[float, str]:
    """(peak, kind): the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / 2**20, "cpu peak RSS"


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    return f"CPU ({platform.processor() or platform.machine()})"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("fastsft", "torch", "transformers", "trl", "peft", "bitsandbytes", "triton", "datasets", "accelerate", "unsloth"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------------------------
# SFTConfig from the recipe
# ----------------------------------------------------------------------------------------------


def sft_config(recipe, output_dir: Path, *, dtype: str, backend: str, data_kwargs: dict):
    import torch
    from trl import SFTConfig

    t = recipe.train
    warmup = t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio  # a float < 1 is a ratio
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=warmup,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        # Unsloth checkpoints its own way (enabled when it loads the model).
        gradient_checkpointing=t.gradient_checkpointing and backend == "transformers",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=t.eval_strategy,
        eval_on_start=t.eval_strategy != "no",  # the base model's held-out loss, for the report
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=t.metric_for_best_model,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,  # our progress line replaces tqdm's
        prediction_loss_only=True,
        loss_type="nll",
        label_smoothing_factor=0.0,  # label smoothing happens in our loss, not in TRL's second forward
        dataloader_num_workers=0,
        **data_kwargs,
    )
    if t.lr_scheduler_type == "cosine_with_min_lr":
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": 0.1}
    kwargs.update(distributed_kwargs(recipe, dtype=dtype))
    return SFTConfig(**kwargs)


def distributed_kwargs(recipe, *, dtype: str) -> dict:
    """TrainingArguments for `[distributed] strategy` when this process is one of several ranks."""
    from . import dist

    if dist.world_size() <= 1:
        return {}
    check_distributed(recipe)
    d, t = recipe.distributed, recipe.train
    if d.strategy == "ddp":
        # LoRA leaves most parameters frozen; none of the trainable ones go unused
        return {"ddp_find_unused_parameters": False}
    if d.strategy == "fsdp":
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                # FSDP recomputes per wrapped layer; the Trainer's checkpointing would all-gather twice
                "activation_checkpointing": bool(t.gradient_checkpointing),
                "state_dict_type": "FULL_STATE_DICT",
            },
            "gradient_checkpointing": False,
        }
    if d.deepspeed_config:
        return {"deepspeed": str(recipe.resolve_path(d.deepspeed_config))}
    return {"deepspeed": zero3_config(dtype)}


def check_distributed(recipe) -> None:
    """Refuse, before any rank starts, a strategy this machine cannot run."""
    import torch

    from .errors import RecipeError

    where = str(recipe.path) if recipe.path else None
    strategy = recipe.distributed.strategy
    if strategy in ("fsdp", "deepspeed-zero3") and not torch.cuda.is_available():
        raise RecipeError(
            f'[distributed] strategy = "{strategy}" needs CUDA GPUs: accelerate shards only across GPUs, so '
            'on the CPU it would silently run plain DDP. Use strategy = "ddp" here.',
            path=where,
        )
    if strategy == "deepspeed-zero3":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError(
                '[distributed] strategy = "deepspeed-zero3" needs DeepSpeed: pip install deepspeed '
                '(or use strategy = "fsdp", which needs nothing more)',
                path=where,
            ) from None


def zero3_config(dtype: str) -> dict:
    """fastsft's DeepSpeed ZeRO-3 config; "auto" values are filled in by transformers from the recipe."""
    return {
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


def make_trainer_class():
    """SFTTrainer with the loss routed through fastsft (imported lazily: trl must come after unsloth)."""
    from trl import SFTTrainer

    class FastSFTTrainer(SFTTrainer):
        """One forward serves loss and metrics: `compute_loss` is replaced, so TRL's fused lm-head
        (TRL 1.15's has no CPU path) and its second no-grad forward for metrics never run."""

        def __init__(self, *args, loss_route, nonfinite_guard=None, **kwargs):
            self.loss_route = loss_route
            self.nonfinite_guard = nonfinite_guard
            self.phase = "train"  # named in an out-of-memory message
            super().__init__(*args, **kwargs)
            # Our loss divides by num_items_in_batch itself; make the Trainer always count it and
            # never divide again by the accumulation steps.
            self.model_accepts_loss_kwargs = True
            self.tokens_seen = 0
            self._tokens_local = None
            # Totals of the whole run, across resumes: the earlier segments' (from the checkpoint's
            # TOTALS file) plus this one's. loss_sum is the sum of the optimizer steps' losses.
            self.totals_before = {"loss_sum": 0.0, "tokens": 0, "train_seconds": 0.0}
            self._loss_sum = None
            self.segment_start = None  # time.perf_counter() when this segment's training began
            # Held-out loss as the token-weighted mean over every scored token (not a mean of batch means)
            self._eval_nll = None
            self._eval_tokens = None
            # our progress line replaces the Trainer's raw log dicts and tqdm bars
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            self.remove_callback(PrinterCallback)
            self.remove_callback(ProgressCallback)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = self.loss_route(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens and DDP averages gradients.
                loss = loss * self.accelerator.num_processes
            if model.training and self.nonfinite_guard is not None:
                self.nonfinite_guard.observe_loss(loss)
            if model.training:
                import torch

                d = loss.detach().float()
                d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # a skipped step adds nothing
                self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
            if model.training and ("attention_mask" in inputs or "input_ids" in inputs):
                # counted on the device; read (one sync, one all-reduce) only when a row is logged.
                # A packed (padding-free) batch has no attention mask and no padding: every id counts.
                mask = inputs.get("attention_mask")
                n = mask.sum() if mask is not None else inputs["input_ids"].new_tensor(inputs["input_ids"].numel())
                self._tokens_local = n if self._tokens_local is None else self._tokens_local + n
            if not model.training and "labels" in inputs:
                from .loss import shift_left

                # the route's loss is the mean over this batch's scored tokens: weight it by their count
                n = (shift_left(inputs["labels"]) != -100).sum()
                nll = loss.detach().float() * n
                self._eval_nll = nll if self._eval_nll is None else self._eval_nll + nll
                self._eval_tokens = n if self._eval_tokens is None else self._eval_tokens + n
            return (loss, outputs) if return_outputs else loss

        def segment_tokens(self) -> int:
            """Tokens trained on in this segment, over every rank (a collective: all ranks call it)."""
            if self._tokens_local is None:
                return 0
            return int(self.accelerator.reduce(self._tokens_local.detach().clone(), "sum"))

        def totals(self) -> dict:
            """The whole run's totals up to now (a collective: all ranks call it)."""
            import torch

            loss = self._loss_sum if self._loss_sum is not None else torch.zeros((), device=self.args.device)
            loss = float(self.accelerator.reduce(loss.detach().clone(), "mean"))
            seconds = time.perf_counter() - self.segment_start if self.segment_start is not None else 0.0
            b = self.totals_before
            return {
                "step": self.state.global_step,
                "loss_sum": b["loss_sum"] + loss,
                "tokens": b["tokens"] + self.segment_tokens(),
                "train_seconds": b["train_seconds"] + seconds,
            }

        def log(self, logs, *args, **kwargs):
            if self.model.training and self._tokens_local is not None:
                self.tokens_seen = self.totals_before["tokens"] + self.segment_tokens()
                self._metrics["train"]["num_tokens"] = [self.tokens_seen]
            return super().log(logs, *args, **kwargs)

        def evaluation_loop(self, *args, **kwargs):
            self._eval_nll = self._eval_tokens = None
            out = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            if self._eval_tokens is not None and f"{prefix}_loss" in out.metrics:
                nll = float(self.accelerator.reduce(self._eval_nll.detach().clone(), "sum"))
                n = int(self.accelerator.reduce(self._eval_tokens.detach().clone(), "sum"))
                if n:
                    out.metrics[f"{prefix}_loss"] = nll / n
            self._eval_nll = self._eval_tokens = None
            return out

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # PEFT's load_adapter upcasts bf16 adapters to float32, while SFTTrainer keeps QLoRA
            # adapters in bf16: put back the dtypes the run trained with, or a resumed run diverges.
            target = model if model is not None else self.model
            dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for n, p in target.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

        def evaluate(self, *args, **kwargs):
            self.phase = "eval"
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.phase = "train"

        def _save_checkpoint(self, model, trial):
            """Atomic checkpoints: written under checkpoints/.staging, renamed into place when whole;
            older ones are rotated out only after that, so a resumable checkpoint always exists.
            Under several ranks, rank 0 owns the folder and every rank writes its RNG state into it."""
            self.phase = "save"
            main = self.args.should_save
            root = Path(self.args.output_dir)
            staging = root / STAGING
            if main:
                shutil.rmtree(staging, ignore_errors=True)
                make_dir(staging)
            self.accelerator.wait_for_everyone()
            original = self._get_output_dir
            self._get_output_dir = lambda trial=None: str(staging)
            limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate after the rename
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._get_output_dir = original
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()
            name = f"checkpoint-{self.state.global_step}"
            best = self.state.best_model_checkpoint
            if best and best.startswith(str(staging)):
                self.state.best_model_checkpoint = str(root / Path(best).name)
                if main:
                    self.state.save_to_json(str(staging / name / "trainer_state.json"))
            totals = self.totals()  # a collective: every rank
            if main:
                write_text(staging / name / TOTALS, json.dumps(totals) + "\n")
                apply_umask(staging / name)
                target = root / name
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging / name, target)
                shutil.rmtree(staging, ignore_errors=True)
                if limit:
                    _rotate(self, root, limit)
            self.accelerator.wait_for_everyone()
            self.phase = "train"

        def _load_optimizer_and_scheduler(self, checkpoint):
            # transformers maps the optimizer state to `args.device` under several ranks, which on
            # the CPU is "cpu:<rank>", a location torch.load cannot restore: load it on the CPU.
            if self.args.world_size > 1 and self.args.device.type == "cpu":
                import torch

                original = torch.load
                torch.load = lambda *a, **k: original(*a, **{**k, "map_location": "cpu"})
                try:
                    return super()._load_optimizer_and_scheduler(checkpoint)
                finally:
                    torch.load = original
            return super()._load_optimizer_and_scheduler(checkpoint)

    return FastSFTTrainer


STAGING = ".staging"
TOTALS = "fastsft_totals.json"  # in each checkpoint: the run's totals up to it, carried across resumes


def _rotate(trainer, root: Path, limit: int) -> None:
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # older transformers: the Trainer's own method
        trainer._rotate_checkpoints(use_mtime=True, output_dir=str(root))
        return
    rotate_checkpoints(
        output_dir=str(root),
        save_total_limit=limit,
        best_model_checkpoint=trainer.state.best_model_checkpoint,
        use_mtime=True,
    )


def make_callbacks(run: RunDir, console, *, max_steps_hint: int | None = None, tokens_before: int = 0):
    from transformers import TrainerCallback

    class ProgressAndMetrics(TrainerCallback):
        """Progress line (step, loss, tokens/s, ETA, memory) and metrics.jsonl, on the main process."""

        def __init__(self):
            self.t0 = None
            self.last_t = None
            self.last_tokens = tokens_before  # num_tokens counts the whole run, across resumes

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if "loss" in logs:
                tokens = int(logs.get("num_tokens", 0))
                dt = max(now - self.last_t, 1e-9)
                row["tokens_per_s"] = (tokens - self.last_tokens) / dt if tokens else None
                self.last_t, self.last_tokens = now, tokens
                mem, _ = peak_memory_gib()
                row["peak_mem_gib"] = round(mem, 3)
                row["elapsed_s"] = round(now - self.t0, 2)
                done, total = state.global_step, state.max_steps
                eta = (now - self.t0) / done * (total - done) if done else float("nan")
                tps = row["tokens_per_s"]
                console.print(
                    f"step {done:>5}/{total}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}  "
                    f"{'-' if tps is None else f'{tps:,.0f}'} tok/s  ETA {_duration(eta)}  mem {mem:.2f} GiB",
                    highlight=False,
                )
            elif "eval_loss" in logs:
                console.print(f"eval  step {state.global_step:>5}  eval_loss {logs['eval_loss']:.4f}", highlight=False)
            run.append_metrics(row)

    return [ProgressAndMetrics()]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------------------------
# Before / after answers, for the report
# ----------------------------------------------------------------------------------------------


def sample_prompts(dataset, n: int = 3) -> list[dict]:
    """The conversation up to the first assistant turn of the first `n` conversational rows, with the
    row's tools: [{"messages": [...], "tools": [...] | None}]."""
    out = []
    if dataset is None:
        return out
    for row in dataset.select(range(min(len(dataset), 50))):
        msgs = row.get("prompt") if isinstance(row.get("prompt"), list) else row.get("messages")
        if not isinstance(msgs, list):
            continue
        prompt = []
        for m in msgs:
            if m.get("role") == "assistant":
                break
            prompt.append({"role": m["role"], "content": m["content"]})
        tools = row.get("tools")
        if isinstance(tools, str):
            tools = json.loads(tools) if tools else None
        if prompt:
            out.append({"messages": prompt, "tools": tools or None})
        if len(out) == n:
            break
    return out


def generate_answers(model, tokenizer, prompts: list[dict], max_new_tokens: int = 32) -> list[dict]:
    """Greedy answers, each with whether it complies with the chat template: it stopped on the
    end-of-turn token within the budget and wrote no role markers (no invented turns)."""
    import torch

    from .chat_templates import end_of_turn_token
    from .use import ROLE_MARKERS

    eot = end_of_turn_token(tokenizer)
    stop_ids = {i for i in (tokenizer.convert_tokens_to_ids(eot) if eot else None, tokenizer.eos_token_id) if i is not None}
    answers = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt["messages"], tools=prompt["tools"], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)  # fmt: skip
        ids = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stop_ids) or None,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        stopped = bool(len(new)) and int(new[-1]) in stop_ids
        raw = tokenizer.decode(new, skip_special_tokens=False)
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        answers.append({"text": text, "complies": stopped and not ROLE_MARKERS.search(raw.rsplit(eot, 1)[0] if eot else raw)})
    if was_training:
        model.train()
    return answers


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def resume_recipe(run_dir: str | Path, recipe_path: str | Path | None, overrides: list[str]):
    """The recipe a resumed run continues with: the one stored in RUN_DIR, with the overrides that do
    not change what is trained. A given RECIPE (or an override) that changes the training is refused
    with the differing keys named."""
    from . import recipe as recipe_mod
    from .errors import RecipeError

    run = RunDir.open(run_dir)
    stored = recipe_mod.load(run / RECIPE)
    wanted = recipe_mod.load(recipe_path).with_absolute_paths() if recipe_path else stored
    if overrides:
        wanted = wanted.with_overrides(list(overrides))
    changed = [k for k in stored.differences(wanted) if k not in recipe_mod.RESUME_SAFE_KEYS]
    if changed:
        raise RecipeError(
            f"--resume {run.path}: the run was trained with a different "
            f"{', '.join(changed)} (stored in {run / RECIPE}). Resuming would change the training; start a "
            "new run instead, or resume without changing those keys. Keys a resume may change: "
            + ", ".join(sorted(recipe_mod.RESUME_SAFE_KEYS)),
            path=str(recipe_path or run / RECIPE),
        )
    return wanted


def run(
    recipe,
    *,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    console=None,
    resume: bool = False,
    policy=None,
    allow_data_change: bool = False,
) -> RunResult:
    """Train `recipe` into a new run directory, or with `resume=True` continue the run in
    `output_dir` from its newest complete checkpoint. `policy` (backends.LoadPolicy) is what loading
    the model may do. Raises fastsft errors for user mistakes.

    The run directory is made (and locked) only once setup (model, data, loss) has passed; an old run
    it replaces is moved aside and deleted once training has started."""
    held: list[RunDir] = []
    try:
        return _run(recipe, output_dir=output_dir, overwrite=overwrite, console=console, resume=resume,
                    policy=policy, allow_data_change=allow_data_change, held=held)  # fmt: skip
    finally:
        for r in held:
            r.unlock()


def _run(recipe, *, output_dir, overwrite, console, resume, policy, allow_data_change, held) -> RunResult:
    from rich.console import Console

    from . import dist
    from .errors import FastSFTError, RunDirError

    dist.setup()  # a no-op unless launched as several ranks (torchrun / accelerate launch)
    main = dist.is_main()
    console = console or Console()
    log = (lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True)) if main else (lambda msg: None)  # noqa: E731

    checkpoint, previous, totals_before = None, {}, None
    if resume:
        run_dir = RunDir.open(output_dir, lock=main)
        if main:
            held.append(run_dir)
        previous = run_dir.read_json(RUN_JSON)
        found = run_dir.latest_checkpoint()
        steps = (previous.get("result") or {}).get("global_step")
        if previous.get("status") == "finished" and (found is None or steps is None or found[0] >= steps):
            raise RunDirError(
                f"--resume {run_dir.path}: this run finished ({steps} steps); nothing was changed. To train "
                "further, start a new run with more steps; to use it: fastsft export / generate / eval "
                f"{run_dir.path}"
            )
        if found is None:
            raise RunDirError(
                f"--resume {run_dir.path}: no complete checkpoint to resume from (the run stopped before "
                f"its first save). Start it again: fastsft run RECIPE -o {run_dir.path} --overwrite"
            )
        step, checkpoint = found
        totals_before = _read_totals(checkpoint)
        log(f"resuming {run_dir.path} from {checkpoint.name} (step {step})")
    else:
        # rank 0 checks the folder now (nothing is loaded for a folder that would be refused) and
        # makes it once setup has passed; every rank then uses the one it made
        path, problem = None, None
        if main:
            try:
                out = Path(output_dir) if output_dir else default_path(recipe.path or "recipe")
                RunDir.check_target(out, overwrite=overwrite)
                path = str(out)
            except FastSFTError as e:
                problem = e
        path, message = dist.broadcast((path, str(problem) if problem else None))
        if problem is not None:
            raise problem
        if message is not None:
            raise RunDirError(message)

    loaded = backends.load_model(recipe, log=log, policy=policy)  # imports unsloth first when it is the backend

    import torch

    from . import data as data_mod
    from . import guard
    from . import loss as loss_mod

    prepared = data_mod.prepare_data(recipe, loaded.tokenizer, log=log)
    if resume:
        was = (previous.get("data") or {}).get("fingerprint")
        if was and was != prepared.fingerprint and not allow_data_change:
            raise RunDirError(
                f"--resume {run_dir.path}: the training data changed since the run started (fingerprint "
                f"{was} then, {prepared.fingerprint} now: the data file, tokenizer or [data] settings differ); "
                "nothing was changed. Put the original data back, start a new run, or pass "
                "--allow-data-change to continue on the new data."
            )
    if prepared.stats.get("added_pad_token") and len(loaded.tokenizer) > loaded.model.get_input_embeddings().num_embeddings:
        loaded.model.resize_token_embeddings(len(loaded.tokenizer))  # the new pad row is never trained on
    device = next(loaded.model.parameters()).device
    route = loss_mod.resolve(recipe, loaded.model, loaded.backend, device)
    route.install(loaded.model)
    log(f"loss: {route.implementation} ({route.reason})")

    estimate = guard.estimate_memory(loaded.model, recipe, route.kernel)
    gpu_total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    line, wont_fit = guard.describe_estimate(estimate, gpu_total)
    log(line)
    if wont_fit:
        log(guard.warn_wont_fit(estimate, gpu_total))
    if recipe.train.save_strategy != "no" and main:
        target = run_dir.path if resume else Path(path)
        guard.check_disk(target, 2 * guard.checkpoint_bytes(loaded.model), "checkpointing")

    # setup passed: the run directory is made (or, resuming, its later rows dropped) only now
    if resume:
        if main:
            shutil.rmtree(run_dir.checkpoints / STAGING, ignore_errors=True)
            run_dir.truncate_metrics(step)
    elif main:
        run_dir = RunDir.create(path, overwrite=overwrite)
        held.append(run_dir)
        if run_dir.replaced is not None:
            log(f"replacing the run in {run_dir.path} (the old one is deleted once this one has started)")
    dist.barrier()
    if not resume and not main:
        run_dir = RunDir(path)
    if not resume:
        log(f"run directory: {run_dir.path}")

    try:
        return _train(recipe, run_dir, loaded, prepared, route, estimate, log=log, console=console, main=main,
                      resume=resume, checkpoint=checkpoint, previous=previous, totals_before=totals_before)  # fmt: skip
    except BaseException:
        if main and run_dir.replaced is not None:  # failed before training started: put the old run back
            run_dir.restore_replaced()
        raise


def _read_totals(checkpoint: Path) -> dict:
    """The run's totals up to `checkpoint` (written by FastSFTTrainer._save_checkpoint)."""
    try:
        t = json.loads((checkpoint / TOTALS).read_text(encoding="utf-8"))
        return {"loss_sum": float(t["loss_sum"]), "tokens": int(t["tokens"]), "train_seconds": float(t["train_seconds"])}
    except (OSError, ValueError, KeyError, TypeError):  # a checkpoint of an older fastsft
        return {"loss_sum": 0.0, "tokens": 0, "train_seconds": 0.0}


def _train(recipe, run_dir, loaded, prepared, route, estimate, *, log, console, main, resume, checkpoint,
           previous, totals_before) -> RunResult:  # fmt: skip
    import torch

    from . import dist, guard
    from .errors import Interrupted

    run_info = {
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "recipe_path": str(recipe.path) if recipe.path else None,
        "versions": versions(),
        "device": device_description(),
        "seed": recipe.train.seed,
        "backend": loaded.backend,
        "backend_reason": loaded.reason,
        "model_path": loaded.model_path,
        "dtype": loaded.dtype,
        "loss": route.describe(),
        "memory_estimate_gib": {k: round(v / 2**30, 3) for k, v in estimate.items()},
        "data": {"fingerprint": prepared.fingerprint, **prepared.stats},
    }
    if dist.world_size() > 1:
        run_info["world_size"] = dist.world_size()
        run_info["distributed"] = {"strategy": recipe.distributed.strategy, "world_size": dist.world_size()}
    if resume:
        run_info["started"] = previous.get("started", run_info["started"])
        run_info["resumed"] = previous.get("resumed", []) + [
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": checkpoint.name}
        ]
        if "before" in previous:
            run_info["before"] = previous["before"]
        if previous.get("data", {}).get("fingerprint") != prepared.fingerprint:
            run_info["data_changed_at"] = checkpoint.name
    if main:
        if not resume:
            run_dir.write_text(RECIPE, recipe.with_absolute_paths().to_toml())
        run_dir.write_json(RUN_JSON, run_info)

    args = sft_config(
        recipe, run_dir.checkpoints, dtype=loaded.dtype, backend=loaded.backend, data_kwargs=prepared.sft_kwargs
    )
    stop = guard.StopOnSignal(log)
    nonfinite = guard.NonFiniteGuard(recipe.train.max_nonfinite_steps, check_grads=loaded.dtype != "fp16", log=log)
    Trainer = make_trainer_class()
    tokens_before = totals_before["tokens"] if totals_before else 0
    trainer = Trainer(
        model=loaded.model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=loaded.tokenizer,
        loss_route=route,
        nonfinite_guard=nonfinite,
        callbacks=make_callbacks(run_dir, console, tokens_before=tokens_before) + [stop.callback(), nonfinite.callback()],
    )
    if totals_before:
        trainer.totals_before = dict(totals_before)

    if dist.world_size() > 1 and main:
        # what the Trainer (accelerate) actually set up, not only what was asked
        engines = {"fsdp": bool(trainer.is_fsdp_enabled), "deepspeed": bool(trainer.is_deepspeed_enabled)}
        run_dir.update_json(RUN_JSON, distributed={**run_info["distributed"], **engines})

    prompts = sample_prompts(prepared.eval if prepared.eval is not None else prepared.train)
    if resume:
        before = [b for b in run_info.get("before", [])] if main else []
    else:
        before = generate_answers(loaded.model, loaded.tokenizer, prompts) if prompts and main else []
        if main and before:
            run_dir.update_json(RUN_JSON, before=before)  # a resume reports the base model's answers too

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if main:
        run_dir.drop_replaced()  # the new run starts: the run it replaces goes
    start_step = trainer.state.global_step if not resume else int(checkpoint.name.rsplit("-", 1)[1])
    trainer.segment_start = time.perf_counter()
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except guard.NonFinite as e:
        kept = run_dir.latest_checkpoint()
        msg = f"{e} Last good checkpoint: {kept[1] if kept else 'none'}."
        if main:
            run_dir.update_json(RUN_JSON, status="stopped: non-finite", error=msg)
        raise guard.NonFinite(msg) from None
    except BaseException as e:
        if guard.is_oom(e):
            err = guard.explain_oom(e, trainer.phase)
            if main:
                run_dir.update_json(RUN_JSON, status="stopped: out of memory", error=str(err))
            raise err from None
        if is_write_error(e):
            err = _write_failed(run_dir, e, trainer.phase, main)
            raise err from None
        if isinstance(e, KeyboardInterrupt) and main:
            run_dir.update_json(RUN_JSON, status="killed", error="interrupted twice; no checkpoint written")
        raise

    if stop.requested:
        kept = run_dir.latest_checkpoint()
        msg = guard.interrupted_message(run_dir.path, trainer.state.global_step, kept[1] if kept else None)
        if main:
            run_dir.update_json(RUN_JSON, status="interrupted", error=msg)
        raise Interrupted(msg, signal_name=stop.requested)

    steps_run = trainer.state.global_step - start_step
    if steps_run > 0 and nonfinite.bad_steps >= steps_run:
        msg = (
            f"every step of the run ({steps_run}) had a NaN or infinite {nonfinite.last_bad[1] if nonfinite.last_bad else 'loss'}; "
            f"no step was applied and nothing was learned. {guard.NONFINITE_CAUSES}."
        )
        if main:
            run_dir.update_json(RUN_JSON, status="stopped: non-finite", error=msg)
        raise guard.NonFinite(msg)

    totals = trainer.totals()  # a collective: every rank
    trainer.save_model(str(run_dir.adapter))  # the Trainer writes on rank 0 only
    if not main:
        return RunResult(run_dir.path, {})
    loaded.tokenizer.save_pretrained(str(run_dir.adapter))
    apply_umask(run_dir.adapter)

    after = generate_answers(loaded.model, loaded.tokenizer, prompts) if prompts else []
    samples = [
        {"prompt": p["messages"][-1]["content"], "before": b["text"] if b else "", "after": a["text"]}
        for p, b, a in zip(prompts, before if len(before) == len(after) else [None] * len(after), after, strict=True)
    ]
    compliance = {
        "base": sum(b["complies"] for b in before) / len(before) if before else None,
        "fine_tuned": sum(a["complies"] for a in after) / len(after) if after else None,
        "n": len(after),
    }
    peak, mem_kind = peak_memory_gib()
    global_step = trainer.state.global_step
    train_seconds = totals["train_seconds"]  # every segment of a resumed run
    summary = {
        "name": run_dir.path.name,
        "model": recipe.model.name,
        "backend": loaded.backend,
        "backend_reason": loaded.reason,
        "dtype": loaded.dtype,
        "load_in_4bit": recipe.model.load_in_4bit,
        "loss": route.describe(),
        "device": run_info["device"],
        "global_step": global_step,
        "train_seconds": train_seconds,
        # the mean optimizer-step loss over the whole run (every segment of a resumed run)
        "train_loss": totals["loss_sum"] / global_step if global_step else result.training_loss,
        "tokens": totals["tokens"],
        "tokens_per_s": totals["tokens"] / train_seconds if train_seconds > 0 else None,
        "peak_mem_gib": peak,
        "mem_kind": mem_kind,
        "samples": samples,
        "samples_source": (
            f"held-out prompts: the first of data.eval ({recipe.data.eval})"
            if prepared.eval is not None and recipe.data.eval
            else "held-out prompts: the first of the val_ratio split, none of which is a training example"
            if prepared.eval is not None
            else "training prompts (the recipe holds no data out): these answers show memorisation"
        ),
        "compliance": compliance,
        "data": {"summary": prepared.stats.get("summary", "")},
    }
    run_dir.update_json(RUN_JSON, status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), result=summary)
    report.write_report(run_dir, summary)

    if recipe.export.formats:
        from . import export as export_mod

        for fmt in recipe.export.formats:
            try:
                export_mod.export_run(run_dir.path, fmt=fmt, dtype=recipe.export.dtype, console=console)
            except BaseException as e:
                if guard.is_oom(e):
                    raise guard.explain_oom(e, f"export ({fmt}, merge)") from None
                raise

    log(f"done: {global_step} steps in {train_seconds:.1f} s; report: {run_dir / 'report.md'}")
    return RunResult(run_dir.path, summary)


def _write_failed(run_dir: RunDir, e: BaseException, phase: str, main: bool):
    """A write that failed during training (a full disk): the half-written checkpoint is removed, run.json
    says so, and the message says how to go on."""
    from .files import describe_os_error

    shutil.rmtree(run_dir.checkpoints / STAGING, ignore_errors=True)  # frees the space it took
    if isinstance(e, WriteFailed):
        what = str(e)
    elif isinstance(e, OSError):
        what = describe_os_error(e, getattr(e, "filename", None) or run_dir.path)
    else:
        what = f"cannot write in {run_dir.path}: {str(e).strip().splitlines()[0]}"
    kept = run_dir.latest_checkpoint()
    msg = (
        f"{what} (during {phase}). The run stopped; "
        + (f"its last complete checkpoint is {kept[1]}. Free some space, then resume: fastsft run --resume {run_dir.path}"
           if kept else "it had no complete checkpoint yet. Free some space, then start it again with --overwrite.")
    )  # fmt: skip
    if main:
        try:
            run_dir.update_json(RUN_JSON, status="stopped: write failed", error=msg)
        except (OSError, WriteFailed):
            pass
    return WriteFailed(msg)


__all__ = ["run", "resume_recipe", "sft_config", "RunResult", "ADAPTER", "METRICS"]
