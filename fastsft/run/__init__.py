"""Training a run: the conductor and what it calls, in the order a run goes.

preflight  checks before anything heavy loads (disk, trackers, the data's files)
train      the conductor: recipe -> backend -> data -> trainer -> run directory; resume; the answers
           before and after
sft_args   the recipe's [train] as TRL's SFTConfig
trainer    the SFTTrainer subclass (the loss route, evaluation, the run directory's writes)
guard      what keeps a run safe: signals, non-finite steps, the memory estimate; the out-of-memory
           advice and the free-space check it names are fastsft.limits (an export uses them too)
health     the numbers watched while training (loss spikes, NaN, gradient norm) and the stop reason
retain     held-out loss on a retained set (how much the run forgot): [data] retain or the shipped general set
task       the task metric on the held-out split's short answers, before and after (for the report)
trackers   TensorBoard / W&B / MLflow reporting
report     the end-of-run summary
"""
