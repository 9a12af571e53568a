"""Memory levers for long sequences, each exact (same loss and gradients as the plain step, to float
rounding; tests/levers/test_levers.py checks each on the CPU), each a `[train]` key, each simulated by
`fastsft plan`:

- offload: gradient checkpointing whose checkpoints (each decoder layer's input hidden states) wait in
  pinned host memory, not on the GPU, and come back for the layer's recomputation in backward.
- expandable_segments: the CUDA caching allocator's expandable segments (less fragmentation).
- frozen_16bit: frozen float32 embeddings / lm_head of a 4-bit model stored in 16 bits (frozen16.py).
- tiled_mlp: the MLP of each decoder layer run over sequence shards (ALST's TiledMLP), so its wide
  intermediate activations exist for one shard at a time, in forward and in backward.
- tiled_layer: every per-token part of each decoder layer (norms, projections with their adapters,
  residuals, MLP) over sequence tiles, only attention over the whole sequence (tiled_layer.py).
"""


def wanted(recipe) -> bool:
    t = recipe.train
    return bool(
        t.offload_checkpoints or t.tiled_mlp or t.tiled_layer or t.frozen_16bit or t.expandable_segments
    )


def callback(recipe, dtype: str):
    """A TrainerCallback installing the recipe's levers when training begins (after the Trainer has
    switched gradient checkpointing on, whose function `offload` replaces)."""
    import torch
    from transformers import TrainerCallback

    t = recipe.train
    if t.expandable_segments and torch.cuda.is_available():
        # segments made from here on grow in place (the training step's, the model is already loaded)
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")

    class _Levers(TrainerCallback):
        frozen: list = []  # what frozen16.install changed, put back when training ends

        def on_train_begin(self, args, state, control, model=None, **kw):
            if t.frozen_16bit and dtype in ("bf16", "fp16"):
                from . import frozen16

                self.frozen = frozen16.install(model, torch.bfloat16 if dtype == "bf16" else torch.float16)
            if t.offload_checkpoints:
                from . import offload

                offload.install(model)
            if t.tiled_mlp:
                from . import tiled_mlp

                tiled_mlp.install(model, t.tiled_mlp)
            if t.tiled_layer:
                from . import tiled_layer

                tiled_layer.install(model, t.tiled_layer)

        def on_train_end(self, args, state, control, **kw):
            # 16-bit frozen weights are exact only under the Trainer's autocast: what runs after training
            # (answers, retain scoring, merge, export) gets them back in float32
            if self.frozen:
                from . import frozen16

                frozen16.restore(self.frozen)
                self.frozen = []

    return _Levers()
