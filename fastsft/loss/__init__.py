"""The training loss and the held-out loss: what a run optimises and what `fastsft eval` and the retain
set measure, one owner for both (below run/, plan/ and use/, which import it; above data/, whose batches
it scores).

route     `[loss] kernel`: the model's loss routed through fastsft's kernels (fused linear cross-entropy,
          the Triton CE, the stock PyTorch loss, Unsloth's), per backend; torch and Triton at load
held_out  the token-weighted mean loss of encoded examples on the trained tokens (eval, the retain set)
"""
