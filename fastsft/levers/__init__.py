"""Memory levers for long sequences, each exact (same loss and gradients as the plain step, to float
rounding; tests/test_levers.py checks each on the CPU), each a `[train]` key, each simulated by
`fastsft plan`:

- offload: gradient checkpointing whose checkpoints (each decoder layer's input hidden states) wait in
  pinned host memory, not on the GPU, and come back for the layer's recomputation in backward.
- tiled_mlp: the MLP of each decoder layer run over sequence shards (ALST's TiledMLP), so its wide
  intermediate activations exist for one shard at a time, in forward and in backward.
"""
