"""Training a run: the conductor and what it calls, in the order a run goes.

preflight  checks before anything heavy loads (disk, trackers, the data's files)
train      the conductor: recipe -> backend -> data -> trainer -> run directory
resume     the run to resume: its stored recipe (overrides a resume may change), checkpoint and data
sft_args   the recipe's [train] as TRL's SFTConfig
trainer    the SFTTrainer subclass (the loss route, evaluation, the run's totals)
callbacks  what a run adds to TRL's loop: progress and metrics.jsonl, atomic checkpoints, guards, health
guard      what keeps a run safe: signals, non-finite steps, the memory estimate; the out-of-memory
           advice and the free-space check it names are fastsft.limits (an export uses them too); each
           way the loop stops, explained
records    what run.json records, built from what the run holds (plain functions)
answers    the base model against the fine-tuned one: sample answers, retain loss, task metric
before     the cache of the base model's before-numbers
health     the numbers watched while training (loss spikes, NaN, gradient norm) and the stop reason
retain     held-out loss on a retained set (how much the run forgot): [data] retain or the shipped general set
task       the task metric on the held-out split's short answers, before and after (for the report)
trackers   TensorBoard / W&B / MLflow reporting
report     the end-of-run summary
"""
