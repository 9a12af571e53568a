"""The base model against the fine-tuned one, for the report: answers to a few sample prompts, the retain
loss and the task metric, before training and after.

- `sample_prompts`, `generate_answers`: the prompts and the greedy answers, each with whether it
  follows the chat template.
- `BeforeAfter`: the run's before-numbers (`before()`, and the trainer's step-0 held-out loss through
  `base_eval`; each from fastsft.run.before's cache when the same base model, data and settings were
  scored already; a resume keeps the first segment's) and the after-numbers beside them
  (`answers_after()`, `retain_after()`).
"""

from __future__ import annotations

import json

from fastsft import dist
from fastsft.chat.generation import answer
from fastsft.chat.templates import end_of_turn_ids
from fastsft.loss.held_out import held_out_loss
from fastsft.run import before as before_cache
from fastsft.run import retain, task
from fastsft.rundir import RUN_JSON

SAMPLE_TOKENS = 32  # the sample prompts' answer budget


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


def fmt_loss(x) -> str:
    return "-" if x is None else f"{x:.4f}"


class BeforeAfter:
    """One run's before- and after-numbers. `loaded` is the backends.Loaded model, `prepared` the data,
    `route` the loss route (the retain loss is the training loss), `run_dir` the RunDir they are
    recorded in (run.json, metrics.jsonl), `run_info` run.json as the run started (a resume's before-numbers).
    `phase(total, what)` is the run's progress bar for a setup phase. Under several ranks every rank calls
    each method; rank 0 (`main`) writes and prints."""

    def __init__(
        self,
        recipe,
        loaded,
        prepared,
        route,
        run_dir,
        run_info: dict,
        *,
        retain_items,
        retain_source,
        resume: bool,
        main: bool,
        log,
        phase,
    ):
        self.recipe, self.loaded, self.prepared, self.route = recipe, loaded, prepared, route
        self.run_dir, self.run_info, self.resume, self.main = run_dir, run_info, resume, main
        self.retain_items, self.retain_source = retain_items, retain_source
        self.log, self.phase = log, phase
        self.reuse: dict[str, str] = {}  # which before-numbers came from the cache
        self._base_fp: tuple[str | None] | None = None  # (the base model's cache fingerprint,), once asked
        self.prompts: list[dict] = []
        self.answers_before: list[dict] = []
        self.retain_before: dict | None = None
        self.task_refs: list = []
        self.task_before: dict | None = None

    # ------------------------------------------------------------------------------------------
    # before
    # ------------------------------------------------------------------------------------------

    def before(self) -> None:
        """The base model's answers, retain loss and task metric, recorded in run.json (with which came
        from the cache: `before_cache`)."""
        self.prompts, self.answers_before = self._answers_before()
        self.retain_before = self._retain_before()
        self.task_refs, self.task_before = self._task_before()
        if self.main and self.reuse:
            self.run_dir.update_json(RUN_JSON, before_cache=self.reuse)

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
            with self.phase(len(prompts), "base model: answers to the sample prompts") as advance:
                return generate_answers(model, tokenizer, prompts, advance=advance)

        parts = {
            "prompts": prompts,
            "max_new_tokens": SAMPLE_TOKENS,
            "template": getattr(tokenizer, "chat_template", None),
            "eot": end_of_turn_ids(tokenizer),
        }
        before = self._cached("answers", parts, compute, "base model's answers") if answers else []
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
            with self.phase(len(refs), what) as advance:
                return task.score(model, tokenizer, refs, advance=advance)

        parts = {
            "refs": refs,
            "max_new_tokens": task.budget(tokenizer, refs),
            "batch_size": task.BATCH,
            "eot": end_of_turn_ids(tokenizer),
        }
        before = self._cached("task", parts, compute, "base model's task metric")
        self.run_dir.update_json(RUN_JSON, task_before=before)
        return refs, before

    def base_eval(self, trainer, compute) -> tuple[dict, bool]:
        """(metrics, reused): the trainer's step-0 evaluation (the base model's held-out loss: a LoRA
        adapter at initialisation changes no output) from the before-numbers' cache, else `compute()`.
        Called by the trainer (FastSFTTrainer.base_eval) during training."""
        args, route = trainer.args, self.route.describe()
        parts = {
            "eval": before_cache.dataset_hash(trainer.eval_dataset),
            "batch_size": args.per_device_eval_batch_size,
            "max_length": self.recipe.data.max_length,
            "precision": {"bf16": bool(args.bf16), "fp16": bool(args.fp16)},
            "collator": {
                k: getattr(args, k, None) for k in ("padding_free", "packing", "completion_only_loss")
            },
            "loss": {k: route[k] for k in ("kernel", "implementation", "label_smoothing")},
        }

        def fresh():
            return {k: float(v) for k, v in compute().items() if isinstance(v, (int, float))}

        metrics = self._cached("eval", parts, fresh, "base model's held-out loss")
        if self.main:
            self.run_dir.update_json(RUN_JSON, before_cache=self.reuse)
        return metrics, self.reuse["eval"] == "reused"

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
            with self.phase(len(self.retain_items), "base model: retain loss") as advance:
                return self._score_retain(advance=advance)

        parts = {
            "items": self.retain_items,
            "max_length": self.recipe.data.max_length,
            "batch_size": t.per_device_eval_batch_size or t.per_device_train_batch_size,
            "pad_id": self.loaded.tokenizer.pad_token_id,
            "loss": {k: route[k] for k in ("kernel", "implementation", "kernel_backend", "label_smoothing")},
        }
        before = self._cached("retain", parts, compute, "base model's retain loss")
        self.run_dir.update_json(RUN_JSON, retain_before=before)
        self.run_dir.append_metrics({"step": 0, "retain_loss": before["loss"]})
        self.log(f"retain loss before training: {fmt_loss(before['loss'])} ({before['tokens']} tokens)")
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

    def _cached(self, kind: str, parts: dict, compute, what: str):
        """A before-number of the base model from fastsft.run.before's cache, else computed (and stored).
        Under several ranks it is computed (the ranks must generate together; the cache is per process)."""
        if self._base_fp is None:
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
                else None,
            )
        value, reused = before_cache.cached(kind, self._base_fp[0], parts, compute)
        self.reuse[kind] = "reused" if reused else "computed"
        if reused:
            self.log(f"{what}: reused from the cache (same base model, data and settings)")
        return value

    # ------------------------------------------------------------------------------------------
    # after
    # ------------------------------------------------------------------------------------------

    def answers_after(self) -> dict:
        """The answers before and after training to the same prompts, how many follow the template, and
        the task metric before -> after: the summary's `samples`, `samples_source`, `compliance`, `task`."""
        before, prompts = self.answers_before, self.prompts
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
        after = []
        if prompts:
            with self.phase(len(prompts), "fine-tuned model: answers to the sample prompts") as advance:
                after = generate_answers(self.loaded.model, self.loaded.tokenizer, prompts, advance=advance)
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
            what = f"fine-tuned model: task metric on {len(self.task_refs)} held-out answers"
            with self.phase(len(self.task_refs), what) as advance:
                after = task.score(self.loaded.model, self.loaded.tokenizer, self.task_refs, advance=advance)
            out["task"] = {"before": self.task_before, "after": after}
        return out

    def retain_after(self, step: int) -> dict | None:
        """The retain loss after training against before (the summary's `retain`; None: not scored), its
        metrics.jsonl row at `step`."""
        if self.retain_items is None:
            return None
        with self.phase(len(self.retain_items), "fine-tuned model: retain loss") as advance:
            after = self._score_retain(advance=advance)
        self.run_dir.append_metrics({"step": step, "retain_loss": after["loss"]})
        vocab = getattr(self.loaded.model.config, "vocab_size", None) or len(self.loaded.tokenizer)
        r = retain.summary(self.retain_before, after, source=self.retain_source, vocab_size=vocab)
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
        self.log(
            f"retain loss: {fmt_loss(r['before'])} before -> {fmt_loss(r['after'])} after training ({delta})"
        )
        return r


__all__ = ["sample_prompts", "generate_answers", "SAMPLE_TOKENS", "BeforeAfter"]
