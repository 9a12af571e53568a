"""One fine-tuning run, top to bottom: recipe -> model -> data -> loss -> trainer -> run directory.

`run()` reads as torchtune's recipes do, in three steps of `Run`, the conductor: `setup()` (the run
directory's checks, data, model, loss, memory and disk, then run.json, the trainer and the base model's
numbers), `train()` (TRL's loop under the signal and non-finite guards, each way it can stop turned into
a fastsft error) and `finish()` (adapter, answers after, summary, report, exports). What it calls, in the
order a run goes:

    resume.py    the run to resume: its stored recipe, the checkpoint, the data it must still match
    preflight.py what `fastsft validate` checks beyond the schema
    sft_args.py  the recipe's [train] as TRL's SFTConfig
    trainer.py   the SFTTrainer subclass (the loss route, the run's totals)
    callbacks.py what the run adds to TRL's loop: progress, atomic checkpoints, guards, health
    records.py   what run.json records (as the run starts, its result, a stop, the fit), as plain functions
    answers.py   the base model against the fine-tuned one: sample answers, retain loss, task metric
    guard.py     the guards (signals, non-finite steps, memory, disk) and how each stop is explained
    report.py    report.md and loss.png

TRL owns the loop; the ranks are in fastsft.dist, the machine's facts in fastsft.machine.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastsft import backends, dist, levers, machine, progress, threads
from fastsft import data as data_mod
from fastsft import export as export_mod
from fastsft.backends.common import fit_embeddings
from fastsft.errors import FastSFTError, Interrupted, RecipeError, RunDirError
from fastsft.files import WriteFailed, apply_umask
from fastsft.run import guard, health, preflight, records, report, retain, trackers
from fastsft.run import resume as resume_mod
from fastsft.run.answers import BeforeAfter
from fastsft.run.sft_args import sft_config
from fastsft.run.trainer import STAGING, make_trainer_class
from fastsft.rundir import RECIPE, RUN_JSON, RunDir, default_path


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


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
        with guard.sigterm_interrupts():
            session.setup()
            return session.finish(session.train())
    except BaseException:
        session.restore_replaced()  # failed before training started: put the old run back
        raise
    finally:
        session.unlock()  # the lock file goes whatever happened (a kill -9's is taken over later)


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
        self.resumed: resume_mod.Resumed | None = None  # resuming: the checkpoint and the earlier run.json

    def log(self, msg: str) -> None:
        if self.main:
            self.console.print(msg, highlight=False, markup=False, soft_wrap=True)

    def _phase(self, total: int | None, what: str):
        """fastsft.progress.bar for a setup phase on rank 0 (a bar on a terminal, else a line at least every
        30 s); nothing on the other ranks."""
        if self.main:
            return progress.bar(self.console, total, what)
        return contextlib.nullcontext(lambda n=1: None)

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step: the run directory's checks, validate's preflight, data, model,
        loss, the memory and disk checks, then (only now) the run directory, run.json, the trainer, the
        numbers before."""
        dist.setup(self.recipe.distributed.timeout)  # a no-op unless launched as several ranks (torchrun)
        target = self._open_resumed() if self.resume else self._check_target()
        self._preflight()
        self._plan()
        self._load()
        self._check_memory_and_disk(target)
        self._make_run_dir(target)
        self._write_run_info()
        self.trainer = self._make_trainer()
        self.compare = BeforeAfter(
            self.recipe,
            self.loaded,
            self.prepared,
            self.route,
            self.run_dir,
            self.run_info,
            retain_items=self.retain_items,
            retain_source=self.retain_source,
            resume=self.resume,
            main=self.main,
            log=self.log,
            phase=self._phase,
        )
        self.compare.before()

    def _open_resumed(self) -> Path:
        """The run to resume (fastsft.run.resume), locked, and the checkpoint to continue from."""
        self.resumed = resume_mod.open_resumed(self.output_dir, main=self.main, held=self.held, log=self.log)
        self.run_dir = self.resumed.run_dir
        return self.run_dir.path

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
        self.planned = records.fit(self.planned, real)
        if real.get("warning"):
            self.log(f"warning: {real['warning']}")
        self.run_dir.update_json(RUN_JSON, fit=self.planned)

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
        if self.resumed is not None:
            resume_mod.refuse_changed_data(self.resumed, prepared.fingerprint, allow=self.allow_data_change)

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
                self.run_dir.truncate_metrics(self.resumed.step)
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

    def _write_run_info(self) -> None:
        """run.json as the run starts (fastsft.run.records; a resume keeps what the earlier segments
        recorded) and recipe.toml."""
        resumed = self.resumed
        self.run_info = info = records.run_info(
            self.recipe,
            self.loaded,
            self.prepared,
            loss=self.route.describe(),
            estimate=self.estimate,
            planned=self.planned,
            facts=records.process_facts(),
            world_size=dist.world_size(),
            previous=resumed.previous if resumed else None,
            resumed_from=resumed.checkpoint.name if resumed else None,
            resumed_at=records.now() if resumed else None,
        )
        if self.main:
            if not self.resume:
                self.run_dir.write_text(RECIPE, self.recipe.with_absolute_paths().to_toml())
            self.run_dir.write_json(RUN_JSON, info)

    def _make_trainer(self):
        """FastSFTTrainer with fastsft's callbacks (fastsft.run.callbacks: progress, signals, non-finite
        steps, health, atomic checkpoints) and the caller's."""
        recipe, loaded, prepared, run_dir = self.recipe, self.loaded, self.prepared, self.run_dir
        # the Trainer writes each checkpoint into checkpoints/.staging; the checkpoint callback moves it
        args = sft_config(
            recipe,
            run_dir.checkpoints / STAGING,
            run_name=run_dir.path.name,  # for W&B / MLflow / trackio
            dtype=loaded.dtype,
            backend=loaded.backend,
            data_kwargs=prepared.sft_kwargs,
        )
        self.stop = guard.StopOnSignal(self.log)
        self.nonfinite = guard.NonFiniteGuard(
            recipe.train.max_nonfinite_steps, check_grads=loaded.dtype != "fp16", log=self.log
        )
        from fastsft.run import callbacks as cb  # transformers: imported after the backend's start

        totals_before = self.resumed.totals_before if self.resumed else None
        # the caller's callbacks run before the guards, so a stop they cause (a signal) counts in that step
        callbacks = [
            cb.ProgressAndMetrics(
                run_dir, self.console, tokens_before=totals_before["tokens"] if totals_before else 0
            ),
            *self.callbacks,
            cb.StopAtSignal(self.stop),
            cb.NonFiniteCheck(self.nonfinite),
            cb.HealthWatch(self.log),
        ]
        if self.main:
            callbacks += trackers.callbacks(recipe, run_dir)
        if levers.wanted(recipe):  # offloaded checkpoints, tiled MLP, 16-bit frozen weights
            callbacks.append(levers.callback(recipe, loaded.dtype))
        if threads.following() and next(loaded.model.parameters()).device.type == "cpu":
            callbacks.append(cb.FollowFreeCores())  # each step on the cores other work leaves free
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
        trainer.add_callback(cb.AtomicCheckpoints(trainer, run_dir.checkpoints))
        if (
            args.eval_on_start
            and trainer.eval_dataset is not None
            and not self.resume
            and dist.world_size() == 1
        ):
            # the base model's step-0 held-out loss, from the before-numbers' cache (set up in setup())
            trainer.base_eval = lambda compute: self.compare.base_eval(trainer, compute)
        if totals_before:
            trainer.totals_before = dict(totals_before)
        if dist.world_size() > 1:
            trainer.add_callback(cb.LocalParameters(trainer, run_dir))
        if dist.world_size() > 1 and self.main:
            # what the Trainer (accelerate) actually set up, not only what was asked
            engines = {"fsdp": bool(trainer.is_fsdp_enabled), "deepspeed": bool(trainer.is_deepspeed_enabled)}
            run_dir.update_json(RUN_JSON, distributed={**self.run_info["distributed"], **engines})
        return trainer

    # ------------------------------------------------------------------------------------------
    # train
    # ------------------------------------------------------------------------------------------

    def train(self):
        """TRL's loop under the signal and non-finite guards. Each way it can stop (non-finite steps, out
        of memory, a full disk, a signal) becomes a fastsft error (fastsft.run.guard), with run.json
        saying so."""
        import torch

        trainer, resumed = self.trainer, self.resumed
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if self.main:
            self.run_dir.drop_replaced()  # the new run starts: the run it replaces goes
        start_step = resumed.step if resumed else trainer.state.global_step
        trainer.segment_start = time.perf_counter()
        try:
            with self.stop:
                result = trainer.train(resume_from_checkpoint=str(resumed.checkpoint) if resumed else None)
        except BaseException as e:
            stopped = guard.explain_stop(e, self.run_dir, trainer.phase, self.run_dir.checkpoints / STAGING)
            if stopped is None:
                raise
            self._record_stop(stopped.status, stopped.message, best_effort=stopped.best_effort)
            if stopped.error is None:
                raise
            raise stopped.error from None
        if self.stop.requested:
            kept = self.run_dir.latest_checkpoint()
            msg = guard.interrupted_message(
                self.run_dir.path, trainer.state.global_step, kept[1] if kept else None
            )
            self._record_stop("interrupted", msg)
            raise Interrupted(msg, signal_name=self.stop.requested)
        steps_run = trainer.state.global_step - start_step
        if steps_run > 0 and self.nonfinite.bad_steps >= steps_run:
            msg = guard.every_step_nonfinite(steps_run, self.nonfinite.last_bad)
            self._record_stop("stopped: non-finite", msg)
            raise guard.NonFinite(msg)
        return result

    def _record_stop(self, status: str, error: str, *, best_effort: bool = False) -> None:
        """run.json says how the run stopped; `best_effort`: a failed write of it is let go (the disk that
        stopped the run is full), the stop's own error is raised all the same."""
        if not self.main:
            return
        try:
            self.run_dir.update_json(RUN_JSON, **records.stop(status, error))
        except (OSError, WriteFailed):
            if not best_effort:
                raise

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
        run_dir.update_json(RUN_JSON, status="finished", finished=records.now(), result=summary)
        report.write_report(run_dir, summary)
        self._export()
        self.log(
            f"done: {summary['global_step']} steps in {summary['train_seconds']:.1f} s; report: {run_dir / 'report.md'}"
        )
        return RunResult(run_dir.path, summary)

    def _summary(self, result, totals: dict) -> dict:
        """run.json's `result` and the report's figures (fastsft.run.records.summary)."""
        samples = self.compare.answers_after()  # generation first: the peak memory below includes it
        peak = machine.peak_memory_gib()
        watch = self._watch(samples["compliance"])
        return records.summary(
            self.recipe,
            self.loaded,
            name=self.run_dir.path.name,
            loss=self.route.describe(),
            device=self.run_info["device"],
            global_step=self.trainer.state.global_step,
            totals=totals,
            training_loss=result.training_loss,
            peak=peak,
            samples=samples,
            data_summary=self.prepared.stats.get("summary", ""),
            watch=watch,
        )

    def _watch(self, compliance: dict) -> dict:
        """The retain loss after training (against before), the health findings over the whole metrics
        history, and whether early stopping ended the run."""
        out: dict = {}
        state = self.trainer.state
        retained = self.compare.retain_after(state.global_step)
        if retained is not None:
            out["retain"] = retained
        out["health"] = [
            f.as_dict() for f in health.diagnose(self.run_dir.read_metrics(), compliance=compliance)
        ]
        patience = self.recipe.train.early_stopping_patience
        if patience is not None:
            out["early_stopping"] = records.early_stopping(patience, state)
        return out

    def _export(self) -> None:
        """The recipe's [export] formats, from the finished run directory, handed the run's recipe (as
        recipe.toml stores it) rather than reading it back."""
        formats = self.recipe.export.formats
        stored = self.recipe.with_absolute_paths() if formats else None
        for fmt in formats:
            try:
                export_mod.export_run(
                    self.run_dir.path,
                    fmt=fmt,
                    dtype=self.recipe.export.dtype,
                    console=self.console,
                    recipe=stored,
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


__all__ = ["run", "Run", "RunResult"]
