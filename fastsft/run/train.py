"""One fine-tuning run, top to bottom: recipe -> model -> data -> loss -> trainer -> run directory.

`run()` reads as torchtune's recipes do, in three steps of `Run`: `setup()` (the run directory's
checks, model, data, loss, memory and disk, then run.json and the trainer), `train()` (TRL's loop
under the signal and non-finite guards, each way it can stop turned into a fastsft error) and
`finish()` (adapter, answers after, summary, report, exports). TRL owns the loop; the trainer
subclass and its callbacks are in trainer.py, the ranks in dist.py, the machine's facts in
machine.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastsft import backends, dist, levers, machine, progress, threads
from fastsft import data as data_mod
from fastsft import export as export_mod
from fastsft import recipe as recipe_mod
from fastsft.backends.common import fit_embeddings
from fastsft.chat.generation import answer
from fastsft.chat.templates import end_of_turn_ids
from fastsft.errors import FastSFTError, Interrupted, RecipeError, RunDirError
from fastsft.files import WriteFailed, apply_umask, describe_os_error, is_write_error
from fastsft.loss.held_out import held_out_loss
from fastsft.run import before as before_cache
from fastsft.run import guard, health, preflight, report, retain, task, trackers
from fastsft.run.sft_args import sft_config
from fastsft.run.trainer import (
    STAGING,
    checkpoint_callback,
    cores_callback,
    make_trainer_class,
    progress_callback,
    read_totals,
    sharding_callback,
)
from fastsft.rundir import RECIPE, RUN_JSON, RunDir, default_path


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


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


SAMPLE_TOKENS = 32  # the sample prompts' answer budget


def generate_answers(
    model, tokenizer, prompts: list[dict], max_new_tokens: int = SAMPLE_TOKENS, advance=None
) -> list[dict]:
    """Greedy answers, each with whether it complies with the chat template: it stopped on the
    end-of-turn token within the budget and wrote no role markers (no invented turns). `advance(n)`:
    progress, called after each answer."""
    eot = end_of_turn_ids(tokenizer)
    out = []
    for prompt in prompts:
        a = answer(
            model,
            tokenizer,
            prompt["messages"],
            eot=eot,
            max_new_tokens=max_new_tokens,
            tools=prompt["tools"],
        )
        out.append({"text": a.text, "complies": a.complies})
        if advance is not None:
            advance(1)
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def resume_recipe(run_dir: str | Path, recipe_path: str | Path | None, overrides: list[str]):
    """The recipe a resumed run continues with: the one stored in RUN_DIR, with the overrides that do
    not change what is trained. A given RECIPE (or an override) that changes the training is refused
    with the differing keys named."""
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
    callbacks: Sequence = (),
) -> RunResult:
    """Train `recipe` into a new run directory, or with `resume=True` continue the run in
    `output_dir` from its newest complete checkpoint. `policy` (backends.LoadPolicy) is what loading
    the model may do; `callbacks` (transformers TrainerCallbacks) run after fastsft's progress line
    and before its signal and non-finite guards. Raises
    fastsft errors for user mistakes.

    The run directory is made (and locked) only once setup (model, data, loss) has passed; an old run
    it replaces is moved aside and deleted once training has started."""
    session = Run(
        recipe,
        output_dir=output_dir,
        overwrite=overwrite,
        console=console,
        resume=resume,
        policy=policy,
        allow_data_change=allow_data_change,
        callbacks=callbacks,
    )
    try:
        with _sigterm_interrupts():
            session.setup()
            return session.finish(session.train())
    except BaseException:
        session.restore_replaced()  # failed before training started: put the old run back
        raise
    finally:
        session.unlock()  # the lock file goes whatever happened (a kill -9's is taken over later)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM outside the training loop (setup, the answers after, exports) stops the run as Ctrl-C does
    (Interrupted, exit 143), so its cleanup (the lock file) happens; inside the loop StopOnSignal's
    checkpointing stop applies."""
    import signal
    import threading

    def _interrupt(signum, frame):
        raise Interrupted("SIGTERM before or after training: nothing to resume from", signal_name="SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is not signal.SIG_DFL:  # a caller's own handler stays
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class Run:
    """One run in three steps, as torchtune's recipes read: `setup()`, `train()`, `finish()`.

    Under several ranks (torchrun) every rank runs each step; rank 0 (`main`) owns the run directory
    and is the only one that writes or prints."""

    def __init__(
        self,
        recipe,
        *,
        output_dir=None,
        overwrite=False,
        console=None,
        resume=False,
        policy=None,
        allow_data_change=False,
        callbacks: Sequence = (),
    ):
        from rich.console import Console

        self.recipe, self.output_dir, self.overwrite, self.resume = recipe, output_dir, overwrite, resume
        self.policy, self.allow_data_change, self.callbacks = policy, allow_data_change, list(callbacks)
        self.console = console or Console()
        self.main = dist.is_main()
        self.run_dir: RunDir | None = None
        self.held: list[RunDir] = []  # locked by this process: unlocked at the end, whatever happens
        self.checkpoint: Path | None = None  # resuming: the checkpoint training continues from
        self.previous: dict = {}  # resuming: run.json as the earlier segment left it
        self.totals_before: dict | None = None  # resuming: the run's totals up to the checkpoint

    def log(self, msg: str) -> None:
        if self.main:
            self.console.print(msg, highlight=False, markup=False, soft_wrap=True)

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step: the run directory's checks, validate's preflight, data, model,
        loss, the memory and disk checks, then (only now) the run directory, run.json, the trainer, the
        answers before."""
        dist.setup(self.recipe.distributed.timeout)  # a no-op unless launched as several ranks (torchrun)
        target = self._open_resumed() if self.resume else self._check_target()
        self._preflight()
        self._plan()
        self._load()
        self._check_memory_and_disk(target)
        self._make_run_dir(target)
        self._write_run_info()
        self.trainer = self._make_trainer()
        self.before_reuse: dict[str, str] = {}  # which before-numbers came from the cache
        self.prompts, self.before = self._answers_before()
        self.retain_before = self._retain_before()
        self.task_refs, self.task_before = self._task_before()
        if self.main and self.before_reuse:
            self.run_dir.update_json(RUN_JSON, before_cache=self.before_reuse)

    def _open_resumed(self) -> Path:
        """The run to resume, locked, and the checkpoint to continue from; a finished run, or a checkpoint
        that lacks a rank's files, is refused (on every rank: on several hosts each reads its own disk)."""
        return dist.together(self._open_resumed_here)

    def _open_resumed_here(self) -> Path:
        run_dir = self.run_dir = RunDir.open(self.output_dir, lock=self.main)
        if self.main:
            self.held.append(run_dir)
        self.previous = previous = run_dir.read_json(RUN_JSON)
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
        step, self.checkpoint = found
        missing = dist.missing_rank_files(run_dir.path, self.checkpoint, dist.world_size())
        if missing is not None:
            raise missing
        self.totals_before = read_totals(self.checkpoint)
        self.log(f"resuming {run_dir.path} from {self.checkpoint.name} (step {step})")
        return run_dir.path

    def _check_target(self) -> Path:
        """Rank 0 checks the new run's folder now (nothing is loaded for a folder that would be refused)
        and makes it once setup has passed; every rank then uses the one it made."""
        path, problem = None, None
        if self.main:
            try:
                out = Path(self.output_dir) if self.output_dir else default_path(self.recipe.path or "recipe")
                RunDir.check_target(out, overwrite=self.overwrite)
                path = str(out)
            except FastSFTError as e:
                problem = e
        path, message = dist.broadcast((path, str(problem) if problem else None))
        if problem is not None:
            raise problem
        if message is not None:
            raise RunDirError(message)
        return Path(path)

    def _preflight(self) -> None:
        """What `fastsft validate` checks beyond the schema (files, names, installed packages, target
        modules), refused before the model loads."""
        found = preflight.problems(self.recipe)
        if found:
            raise RecipeError(found, path=str(self.recipe.path) if self.recipe.path else None)

    def _load(self) -> None:
        """The data first (the model folder's tokenizer; a bad row or, on a resume, changed data is refused
        before any weight is read), then the model (the backend's), the loss."""
        recipe = self.recipe
        from fastsft.loss import route as loss_mod

        start = backends.start(recipe, log=self.log, policy=self.policy)  # unsloth imported first
        tokenizer = start.tokenizer()
        self.prepared = prepared = data_mod.prepare_data(recipe, tokenizer, log=self.log)
        self._refuse_changed_data(prepared)
        with self._phase(None, f"loading the model ({recipe.model.name})"):
            self.loaded = loaded = start.load(log=self.log, tokenizer=tokenizer)
        if loaded.tokenizer is not tokenizer:  # Unsloth's own tokenizer: set up as the data set up the first
            self.prepared = prepared = data_mod.prepare_data(recipe, loaded.tokenizer, log=lambda m: None)
            self._refuse_changed_data(prepared)
            # Unsloth loaded the model before the data could add a pad token: its row is added now (the
            # transformers backend is handed the data's tokenizer and adds it before LoRA)
            fit_embeddings(loaded.model, loaded.tokenizer)
        self.retain_items, self.retain_source = retain.encode(recipe, loaded.tokenizer, log=self.log)
        model = loaded.model
        self.route = loss_mod.resolve(recipe, model, loaded.backend, next(model.parameters()).device)
        self.route.install(model)
        self.log(f"loss: {self.route.implementation} ({self.route.reason})")

    def _refuse_changed_data(self, prepared) -> None:
        """On a resume, data that changed since the run started is refused (unless --allow-data-change)."""
        was = (self.previous.get("data") or {}).get("fingerprint")
        if self.resume and was and was != prepared.fingerprint and not self.allow_data_change:
            raise RunDirError(
                f"--resume {self.run_dir.path}: the training data changed since the run started (fingerprint "
                f"{was} then, {prepared.fingerprint} now: the data file, tokenizer or [data] settings differ); "
                "nothing was changed. Put the original data back, start a new run, or pass "
                "--allow-data-change to continue on the new data."
            )

    def _plan(self) -> None:
        """On a GPU, before the model loads, by [train] fit (fastsft.plan.fit_recipe): the plan's simulated
        peak for the GPU's free memory; with "auto" the exact levers that make it fit are applied (the run
        goes on with the changed recipe, as if its keys were set) or the run stops here when nothing fits;
        the plan's peak is put beside the real one after the first optimizer steps (run.json's `fit`).
        Under several ranks rank 0 only warns (the plan is one GPU's, not a sharded step's)."""
        from fastsft import plan

        self.gpu_total, self.planned = guard.gpu_memory(), None
        if self.gpu_total is None or not self.main:
            return
        mode = None if dist.world_size() == 1 else "warn"
        budget = plan.free_memory() or self.gpu_total
        self.recipe, self.planned = plan.fit_recipe(self.recipe, budget, self.log, mode=mode)
        if self.planned is not None:
            self.callbacks.append(
                plan.fit_mod.callback(self.planned.pop("planned_reserved_bytes"), self._record_fit)
            )

    def _record_fit(self, real: dict) -> None:
        """The plan against the first optimizer steps' torch.cuda.max_memory_reserved(), into run.json."""
        self.planned.update(real)
        if real.get("warning"):
            self.log(f"warning: {real['warning']}")
        self.run_dir.update_json(RUN_JSON, fit=self.planned)

    def _check_memory_and_disk(self, target: Path) -> None:
        """The formula's memory estimate (run.json; printed where no plan was: on the CPU, or a model the
        simulation cannot build); refuse a disk too full to hold the checkpoints."""
        self.estimate = guard.estimate_memory(self.loaded.model, self.recipe, self.route.kernel)
        if (
            self.planned is None and self.gpu_total is not None
        ):  # a GPU figure only on a GPU (run.json keeps it)
            line, wont_fit = guard.describe_estimate(self.estimate, self.gpu_total)
            self.log(line)
            if wont_fit:
                self.log(guard.warn_wont_fit(self.estimate, self.gpu_total))
        if self.recipe.train.save_strategy != "no" and self.main:
            guard.check_disk(target, 2 * guard.checkpoint_bytes(self.loaded.model), "checkpointing")

    def _make_run_dir(self, target: Path) -> None:
        """Setup passed: the run directory is made (or, resuming, its later rows dropped) only now."""
        if self.resume:
            if self.main:
                shutil.rmtree(self.run_dir.checkpoints / STAGING, ignore_errors=True)
                self.run_dir.truncate_metrics(self.checkpoint_step)
        elif self.main:
            self.run_dir = RunDir.create(target, overwrite=self.overwrite)
            self.held.append(self.run_dir)
            if self.run_dir.replaced is not None:
                self.log(
                    f"replacing the run in {self.run_dir.path} (the old one is deleted once this one has started)"
                )
        dist.barrier()
        if not self.resume:
            if not self.main:
                self.run_dir = RunDir(target)
            self.log(f"run directory: {self.run_dir.path}")

    @property
    def checkpoint_step(self) -> int:
        return int(self.checkpoint.name.rsplit("-", 1)[1])

    def _write_run_info(self) -> None:
        """run.json as the run starts (a resume keeps what the earlier segments recorded) and recipe.toml."""
        recipe, loaded, prepared, previous = self.recipe, self.loaded, self.prepared, self.previous
        info = {
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
            "recipe_path": str(recipe.path) if recipe.path else None,
            "versions": machine.versions(),
            "device": machine.device_description(),
            "cpu_threads": threads.facts(),  # OpenMP's wait policy and who chose it (fastsft.threads)
            "seed": recipe.train.seed,
            "backend": loaded.backend,
            "backend_reason": loaded.reason,
            "model_path": loaded.model_path,
            "dtype": loaded.dtype,
            "loss": self.route.describe(),
            "memory_estimate_gib": {k: round(v / 2**30, 3) for k, v in self.estimate.items()},
            **({"fit": self.planned} if self.planned else {}),  # [train] fit: changes, planned peak
            "data": {"fingerprint": prepared.fingerprint, **prepared.stats},
        }
        if dist.world_size() > 1:
            info["world_size"] = dist.world_size()
            info["distributed"] = {"strategy": recipe.distributed.strategy, "world_size": dist.world_size()}
        if self.resume:
            info["started"] = previous.get("started", info["started"])
            info["resumed"] = previous.get("resumed", []) + [
                {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": self.checkpoint.name}
            ]
            if "before" in previous:
                info["before"] = previous["before"]
            if "retain_before" in previous:
                info["retain_before"] = previous["retain_before"]
            if previous.get("data", {}).get("fingerprint") != prepared.fingerprint:
                info["data_changed_at"] = self.checkpoint.name
        self.run_info = info
        if self.main:
            if not self.resume:
                self.run_dir.write_text(RECIPE, recipe.with_absolute_paths().to_toml())
            self.run_dir.write_json(RUN_JSON, info)

    def _make_trainer(self):
        """FastSFTTrainer with fastsft's callbacks (progress, signals, non-finite steps, atomic
        checkpoints) and the caller's."""
        recipe, loaded, prepared, run_dir = self.recipe, self.loaded, self.prepared, self.run_dir
        # the Trainer writes each checkpoint into checkpoints/.staging; the checkpoint callback moves it
        args = sft_config(
            recipe,
            run_dir.checkpoints / STAGING,
            dtype=loaded.dtype,
            backend=loaded.backend,
            data_kwargs=prepared.sft_kwargs,
        )
        self.stop = guard.StopOnSignal(self.log)
        self.nonfinite = guard.NonFiniteGuard(
            recipe.train.max_nonfinite_steps, check_grads=loaded.dtype != "fp16", log=self.log
        )
        tokens_before = self.totals_before["tokens"] if self.totals_before else 0
        # the caller's callbacks run before the guards, so a stop they cause (a signal) counts in that step
        callbacks = [
            progress_callback(run_dir, self.console, tokens_before=tokens_before),
            *self.callbacks,
            self.stop.callback(),
            self.nonfinite.callback(),
            health.callback(self.log),
        ]
        if self.main:
            callbacks += trackers.callbacks(recipe, run_dir)
        if levers.wanted(recipe):  # offloaded checkpoints, tiled MLP, 16-bit frozen weights
            callbacks.append(levers.callback(recipe, loaded.dtype))
        if threads.following() and next(loaded.model.parameters()).device.type == "cpu":
            callbacks.append(cores_callback())  # each step on the cores other work leaves free
        early = health.early_stopping_callback(recipe)
        if early is not None:
            callbacks.append(early)
        trainer = make_trainer_class()(
            model=loaded.model,
            args=args,
            train_dataset=prepared.train,
            eval_dataset=prepared.eval,
            processing_class=loaded.tokenizer,
            loss_route=self.route,
            nonfinite_guard=self.nonfinite,
            callbacks=callbacks,
        )
        trainer.add_callback(checkpoint_callback(trainer, run_dir.checkpoints))
        if (
            args.eval_on_start
            and trainer.eval_dataset is not None
            and not self.resume
            and dist.world_size() == 1
        ):
            trainer.base_eval = lambda compute: self._base_eval(trainer, compute)
        if self.totals_before:
            trainer.totals_before = dict(self.totals_before)
        if dist.world_size() > 1:
            trainer.add_callback(sharding_callback(trainer, run_dir))
        if dist.world_size() > 1 and self.main:
            # what the Trainer (accelerate) actually set up, not only what was asked
            engines = {"fsdp": bool(trainer.is_fsdp_enabled), "deepspeed": bool(trainer.is_deepspeed_enabled)}
            run_dir.update_json(RUN_JSON, distributed={**self.run_info["distributed"], **engines})
        return trainer

    def _answers_before(self) -> tuple[list[dict], list[dict]]:
        """The report's prompts and the base model's answers to them (a resume keeps the first segment's)."""
        prepared = self.prepared
        prompts = sample_prompts(prepared.eval if prepared.eval is not None else prepared.train)
        if self.resume:
            return prompts, list(self.run_info.get("before", [])) if self.main else []
        # sharded: on every rank, as under ZeRO-3 transformers' generate steps the ranks together
        # (synced_gpus); the weights are still whole here, so every rank answers the same
        answers = prompts and (self.main or dist.sharded(self.recipe))
        model, tokenizer = self.loaded.model, self.loaded.tokenizer

        def compute():
            with self._phase(len(prompts), "base model: answers to the sample prompts") as advance:
                return generate_answers(model, tokenizer, prompts, advance=advance)

        parts = {
            "prompts": prompts,
            "max_new_tokens": SAMPLE_TOKENS,
            "template": getattr(tokenizer, "chat_template", None),
            "eot": end_of_turn_ids(tokenizer),
        }
        before = self._cached_before("answers", parts, compute, "base model's answers") if answers else []
        if self.main and before:
            self.run_dir.update_json(RUN_JSON, before=before)  # a resume reports the base model's answers too
        return prompts, before

    def _task_before(self) -> tuple[list, dict | None]:
        """The held-out split's short answers (fastsft.run.task) and the base model's score on them."""
        if not self.main or dist.sharded(self.recipe):
            # sharded: rank 0 alone cannot run a model whose shards the others hold (under ZeRO-3 the
            # weights are partitioned as they load, so a forward here would wait for ranks that never come)
            return [], None
        refs = task.held_out(self.prepared, self.loaded.tokenizer)
        if not refs or self.resume:
            return refs, self.run_info.get("task_before")
        model, tokenizer = self.loaded.model, self.loaded.tokenizer

        def compute():
            what = f"base model: task metric on {len(refs)} held-out answers"
            with self._phase(len(refs), what) as advance:
                return task.score(model, tokenizer, refs, advance=advance)

        parts = {
            "refs": refs,
            "max_new_tokens": task.budget(tokenizer, refs),
            "batch_size": task.BATCH,
            "eot": end_of_turn_ids(tokenizer),
        }
        before = self._cached_before("task", parts, compute, "base model's task metric")
        self.run_dir.update_json(RUN_JSON, task_before=before)
        return refs, before

    def _base_eval(self, trainer, compute) -> tuple[dict, bool]:
        """(metrics, reused): the trainer's step-0 evaluation (the base model's held-out loss: a LoRA
        adapter at initialisation changes no output) from the before-numbers' cache, else `compute()`."""
        args = trainer.args
        parts = {
            "eval": before_cache.dataset_hash(trainer.eval_dataset),
            "batch_size": args.per_device_eval_batch_size,
            "max_length": self.recipe.data.max_length,
            "precision": {"bf16": bool(args.bf16), "fp16": bool(args.fp16)},
            "collator": {
                k: getattr(args, k, None) for k in ("padding_free", "packing", "completion_only_loss")
            },
            "loss": {k: self.route.describe()[k] for k in ("kernel", "implementation", "label_smoothing")},
        }

        def fresh():
            return {k: float(v) for k, v in compute().items() if isinstance(v, (int, float))}

        metrics = self._cached_before("eval", parts, fresh, "base model's held-out loss")
        if self.main:
            self.run_dir.update_json(RUN_JSON, before_cache=self.before_reuse)
        return metrics, self.before_reuse["eval"] == "reused"

    def _retain_before(self) -> dict | None:
        """The retain set's loss under the base model (a resume keeps the first segment's)."""
        if (
            self.retain_items is not None
            and dist.world_size() > 1
            and self.recipe.distributed.strategy != "ddp"
        ):
            self.log(
                f"retain: not scored under {self.recipe.distributed.strategy} (sharded weights); score it "
                f"after the run with fastsft eval RUN --data {self.retain_source}"
            )
            self.retain_items = None
        if self.retain_items is None or not self.main or self.resume:
            return self.run_info.get("retain_before")
        t, route = self.recipe.train, self.route.describe()

        def compute():
            with self._phase(len(self.retain_items), "base model: retain loss") as advance:
                return self._score_retain(advance=advance)

        parts = {
            "items": self.retain_items,
            "max_length": self.recipe.data.max_length,
            "batch_size": t.per_device_eval_batch_size or t.per_device_train_batch_size,
            "pad_id": self.loaded.tokenizer.pad_token_id,
            "loss": {k: route[k] for k in ("kernel", "implementation", "kernel_backend", "label_smoothing")},
        }
        before = self._cached_before("retain", parts, compute, "base model's retain loss")
        self.run_dir.update_json(RUN_JSON, retain_before=before)
        self.run_dir.append_metrics({"step": 0, "retain_loss": before["loss"]})
        self.log(f"retain loss before training: {_fmt_loss(before['loss'])} ({before['tokens']} tokens)")
        return before

    def _score_retain(self, advance=None) -> dict:
        t, tokenizer = self.recipe.train, self.loaded.tokenizer
        return held_out_loss(
            self.loaded.model,
            self.retain_items,
            max_length=self.recipe.data.max_length,
            batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            loss=lambda model, batch: self.route(model, batch, None)[0],  # the training loss
            advance=advance,
        )

    def _phase(self, total: int | None, what: str):
        """fastsft.progress.bar for a setup phase on rank 0 (a bar on a terminal, else a line at least every
        30 s); nothing on the other ranks."""
        if self.main:
            return progress.bar(self.console, total, what)
        return contextlib.nullcontext(lambda n=1: None)

    def _cached_before(self, kind: str, parts: dict, compute, what: str):
        """A before-number of the base model from fastsft.run.before's cache, else computed (and stored).
        Under several ranks it is computed (the ranks must generate together; the cache is per process)."""
        if not hasattr(self, "_base_fp"):
            loaded, recipe = self.loaded, self.recipe
            self._base_fp = (
                before_cache.model_fingerprint(
                    loaded.model_path,
                    model=recipe.model.as_dict(),
                    backend=loaded.backend,
                    dtype=loaded.dtype,
                    method=recipe.train.method,
                )
                if dist.world_size() == 1
                else None
            )
        value, reused = before_cache.cached(kind, self._base_fp, parts, compute)
        self.before_reuse[kind] = "reused" if reused else "computed"
        if reused:
            self.log(f"{what}: reused from the cache (same base model, data and settings)")
        return value

    # ------------------------------------------------------------------------------------------
    # train
    # ------------------------------------------------------------------------------------------

    def train(self):
        """TRL's loop under the signal and non-finite guards. Each way it can stop (non-finite steps, out
        of memory, a full disk, a signal) becomes a fastsft error, with run.json saying so."""
        import torch

        trainer = self.trainer
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if self.main:
            self.run_dir.drop_replaced()  # the new run starts: the run it replaces goes
        start_step = self.checkpoint_step if self.resume else trainer.state.global_step
        trainer.segment_start = time.perf_counter()
        try:
            with self.stop:
                result = trainer.train(
                    resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None
                )
        except BaseException as e:
            err = self._explain_stop(e)
            if err is None:
                raise
            raise err from None
        if self.stop.requested:
            kept = self.run_dir.latest_checkpoint()
            msg = guard.interrupted_message(
                self.run_dir.path, trainer.state.global_step, kept[1] if kept else None
            )
            self._record_stop("interrupted", msg)
            raise Interrupted(msg, signal_name=self.stop.requested)
        steps_run = trainer.state.global_step - start_step
        if steps_run > 0 and self.nonfinite.bad_steps >= steps_run:
            last = self.nonfinite.last_bad
            msg = (
                f"every step of the run ({steps_run}) had a NaN or infinite {last[1] if last else 'loss'}; "
                f"no step was applied and nothing was learned. {guard.NONFINITE_CAUSES}."
            )
            self._record_stop("stopped: non-finite", msg)
            raise guard.NonFinite(msg)
        return result

    def _explain_stop(self, e: BaseException) -> FastSFTError | None:
        """The fastsft error for an exception out of the loop (None: re-raise it as it is)."""
        if isinstance(e, guard.NonFinite):
            kept = self.run_dir.latest_checkpoint()
            msg = f"{e} Last good checkpoint: {kept[1] if kept else 'none'}."
            self._record_stop("stopped: non-finite", msg)
            return guard.NonFinite(msg)
        if guard.is_oom(e):
            err = guard.explain_oom(e, self.trainer.phase)
            self._record_stop("stopped: out of memory", str(err))
            return err
        if is_write_error(e):
            return self._write_failed(e)
        if isinstance(e, KeyboardInterrupt):
            self._record_stop("killed", "interrupted twice; no checkpoint written")
        return None

    def _record_stop(self, status: str, error: str) -> None:
        if self.main:
            self.run_dir.update_json(RUN_JSON, status=status, error=error)

    def _write_failed(self, e: BaseException) -> WriteFailed:
        """A write that failed during training (a full disk): the half-written checkpoint is removed,
        run.json says so, and the message says how to go on."""
        run_dir = self.run_dir
        shutil.rmtree(run_dir.checkpoints / STAGING, ignore_errors=True)  # frees the space it took
        if isinstance(e, WriteFailed):
            what = str(e)
        elif isinstance(e, OSError):
            what = describe_os_error(e, getattr(e, "filename", None) or run_dir.path)
        else:
            what = f"cannot write in {run_dir.path}: {str(e).strip().splitlines()[0]}"
        kept = run_dir.latest_checkpoint()
        msg = f"{what} (during {self.trainer.phase}). The run stopped; " + (
            f"its last complete checkpoint is {kept[1]}. Free some space, then resume: fastsft run --resume {run_dir.path}"
            if kept
            else "it had no complete checkpoint yet. Free some space, then start it again with --overwrite."
        )
        try:
            self._record_stop("stopped: write failed", msg)
        except (OSError, WriteFailed):
            pass
        return WriteFailed(msg)

    # ------------------------------------------------------------------------------------------
    # finish
    # ------------------------------------------------------------------------------------------

    def finish(self, result) -> RunResult:
        """The adapter and tokenizer, the answers after, run.json's result, the report, the exports."""
        run_dir, trainer, tokenizer = self.run_dir, self.trainer, self.loaded.tokenizer
        totals = trainer.totals()  # a collective: every rank
        weights = run_dir.weights_dir(self.recipe.train.method)  # adapter/, or model/ for a full fine-tune
        trainer.save_model(str(weights))  # the Trainer writes on rank 0 only
        if not self.main:
            return RunResult(run_dir.path, {})
        tokenizer.save_pretrained(str(weights))
        apply_umask(weights)
        summary = self._summary(result, totals)
        run_dir.update_json(
            RUN_JSON, status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), result=summary
        )
        report.write_report(run_dir, summary)
        self._export()
        self.log(
            f"done: {summary['global_step']} steps in {summary['train_seconds']:.1f} s; report: {run_dir / 'report.md'}"
        )
        return RunResult(run_dir.path, summary)

    def _summary(self, result, totals: dict) -> dict:
        """run.json's `result` and the report's figures; loss, tokens and time cover every segment."""
        recipe, loaded, prepared = self.recipe, self.loaded, self.prepared
        samples = self._samples()  # generation first: the peak memory below includes it
        peak, mem_kind = machine.peak_memory_gib()
        global_step = self.trainer.state.global_step
        train_seconds = totals["train_seconds"]
        return {
            "name": self.run_dir.path.name,
            "model": recipe.model.name,
            "backend": loaded.backend,
            "backend_reason": loaded.reason,
            "dtype": loaded.dtype,
            "load_in_4bit": recipe.model.load_in_4bit,
            "method": recipe.train.method,
            "trainable_parameters": loaded.info.get("trainable_parameters"),
            "loss": self.route.describe(),
            "device": self.run_info["device"],
            "global_step": global_step,
            "train_seconds": train_seconds,
            # the mean optimizer-step loss over the whole run (every segment of a resumed run)
            "train_loss": totals["loss_sum"] / global_step if global_step else result.training_loss,
            "tokens": totals["tokens"],
            "tokens_per_s": totals["tokens"] / train_seconds if train_seconds > 0 else None,
            "peak_mem_gib": peak,
            "mem_kind": mem_kind,
            **samples,
            "data": {"summary": prepared.stats.get("summary", "")},
            **self._watch(samples["compliance"]),
        }

    def _watch(self, compliance: dict) -> dict:
        """The retain loss after training (against before), the health findings over the whole metrics
        history, and whether early stopping ended the run."""
        out: dict = {}
        state = self.trainer.state
        if self.retain_items is not None:
            after = self._score_retain()
            self.run_dir.append_metrics({"step": state.global_step, "retain_loss": after["loss"]})
            vocab = getattr(self.loaded.model.config, "vocab_size", None) or len(self.loaded.tokenizer)
            out["retain"] = r = retain.summary(
                self.retain_before, after, source=self.retain_source, vocab_size=vocab
            )
            delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
            self.log(
                f"retain loss: {_fmt_loss(r['before'])} before -> {_fmt_loss(r['after'])} after training ({delta})"
            )
        out["health"] = [
            f.as_dict() for f in health.diagnose(self.run_dir.read_metrics(), compliance=compliance)
        ]
        if self.recipe.train.early_stopping_patience is not None:
            out["early_stopping"] = {
                "patience": self.recipe.train.early_stopping_patience,
                "stopped_early": state.global_step < state.max_steps,
                "max_steps": state.max_steps,
                "best_checkpoint": state.best_model_checkpoint,
                "best_metric": state.best_metric,
            }
        return out

    def _samples(self) -> dict:
        """The answers before and after training to the same prompts, and how many follow the template."""
        before, prompts = self.before, self.prompts
        if dist.sharded(self.recipe):  # rank 0 alone cannot run a model whose shards the others hold
            why = dist.SHARDED_ANSWERS.format(
                strategy=self.recipe.distributed.strategy, run=self.run_dir.path
            )
            self.log(why)
            return {
                "samples": [],
                "samples_skipped": why,
                "compliance": {"base": None, "fine_tuned": None, "n": 0},
            }
        after = generate_answers(self.loaded.model, self.loaded.tokenizer, prompts) if prompts else []
        paired = before if len(before) == len(after) else [None] * len(after)
        samples = [
            {"prompt": p["messages"][-1]["content"], "before": b["text"] if b else "", "after": a["text"]}
            for p, b, a in zip(prompts, paired, after, strict=True)
        ]
        prepared, recipe = self.prepared, self.recipe
        source = (
            f"held-out prompts: the first of data.eval ({recipe.data.eval})"
            if prepared.eval is not None and recipe.data.eval
            else "held-out prompts: the first of the val_ratio split, none of which is a training example"
            if prepared.eval is not None
            else "training prompts (the recipe holds no data out): these answers show memorisation"
        )
        compliance = {
            "base": sum(b["complies"] for b in before) / len(before) if before else None,
            "fine_tuned": sum(a["complies"] for a in after) / len(after) if after else None,
            "n": len(after),
        }
        out = {"samples": samples, "samples_source": source, "compliance": compliance}
        if self.task_refs:  # the task metric on the held-out split's short answers, before -> after
            after = task.score(self.loaded.model, self.loaded.tokenizer, self.task_refs)
            out["task"] = {"before": self.task_before, "after": after}
        return out

    def _export(self) -> None:
        """The recipe's [export] formats, from the finished run directory."""
        for fmt in self.recipe.export.formats:
            try:
                export_mod.export_run(
                    self.run_dir.path, fmt=fmt, dtype=self.recipe.export.dtype, console=self.console
                )
            except BaseException as e:
                if guard.is_oom(e):
                    raise guard.explain_oom(e, f"export ({fmt}, merge)") from None
                raise

    # ------------------------------------------------------------------------------------------
    # cleanup
    # ------------------------------------------------------------------------------------------

    def restore_replaced(self) -> None:
        """A run that failed before training started puts back the run it was replacing."""
        if self.main and self.run_dir is not None and self.run_dir.replaced is not None:
            self.run_dir.restore_replaced()

    def unlock(self) -> None:
        for r in self.held:
            r.unlock()


def _fmt_loss(x) -> str:
    return "-" if x is None else f"{x:.4f}"


__all__ = ["run", "Run", "resume_recipe", "RunResult"]
