"""Routes the training loss of each backend through fastsft's kernels.

`[loss] kernel`:
- `fastsft-linear`: last hidden states + lm_head weight -> `fused_linear_cross_entropy`; the full
  (tokens x vocabulary) logits are never built.
- `fastsft`: the model's logits -> `fused_cross_entropy`.
- `torch`: the stock loss (float32 upcast + `F.cross_entropy`), the baseline.
- `unsloth`: Unsloth's own fused loss (Unsloth backend only).
- `auto`: `fastsft-linear` where the architecture is in `ARCHITECTURES`, else `fastsft`.

Seams, per backend:
- transformers: for `fastsft-linear` the causal-LM `forward` of the model instance is replaced by
  `_linear_loss_forward`, a small explicit patch driven by the architecture's entry in
  `ARCHITECTURES` (backbone attribute, head, final-logit softcap). The call still goes through the
  PEFT / DDP wrappers, so gradient sync and hooks are untouched. Without labels (generation,
  evaluation of logits) the original forward runs.
- unsloth: Unsloth replaces `*ForCausalLM.forward` with its own, which computes its own loss when
  given labels and never consults `model.loss_function`. We call it without labels and with
  `UNSLOTH_RETURN_HIDDEN_STATES=1` (its `logits` output then holds the last hidden states) for
  `fastsft-linear`, or `UNSLOTH_RETURN_LOGITS=1` for `fastsft`, and compute the loss here; Unsloth's
  other speed-ups (its attention, RoPE, MLP kernels, checkpointing) stay.

Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) with `output_router_logits` keep their
router's load-balancing loss: `router_aux_loss_coef * aux_loss` is added to our loss exactly as the
model's own forward adds it to the stock one (`with_router_aux`), on every route.

Normalisation: the loss is summed over the supervised tokens and divided once by
`num_items_in_batch` (the supervised tokens of the whole accumulated batch, counted by the Trainer
after the causal shift), so the loss of an accumulated batch equals that of the same tokens in one
batch. Without it (evaluation), it is the mean over this batch's supervised tokens.
"""

from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsft import dist
from fastsft.data.encode import IGNORE_INDEX
from fastsft.errors import BackendError, RecipeError
from fastsft.kernels import fused_cross_entropy, fused_linear_cross_entropy, triton_available


@dataclass(frozen=True)
class ArchSpec:
    """What the linear-loss forward needs to know of one causal-LM class."""

    backbone: str = "model"  # attribute holding the decoder that returns last_hidden_state
    head: str = "lm_head"
    softcap_attr: str | None = None  # config attribute of a final-logit softcap (Gemma 2/3)
    router_aux: bool = False  # a mixture of experts whose router adds a load-balancing loss


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "Qwen2ForCausalLM": ArchSpec(),
    "Qwen3ForCausalLM": ArchSpec(),
    "Gemma2ForCausalLM": ArchSpec(softcap_attr="final_logit_softcapping"),
    "Gemma3ForCausalLM": ArchSpec(softcap_attr="final_logit_softcapping"),
    "MixtralForCausalLM": ArchSpec(router_aux=True),
    "Qwen2MoeForCausalLM": ArchSpec(router_aux=True),
    "Qwen3MoeForCausalLM": ArchSpec(router_aux=True),
}


def with_router_aux(lm, loss: torch.Tensor, aux_loss) -> torch.Tensor:
    """`loss + router_aux_loss_coef * aux_loss`, as a mixture-of-experts `*ForCausalLM.forward` adds it
    when it computes the loss itself; `loss` unchanged for a model without a router loss (aux_loss None)."""
    if aux_loss is None:
        return loss
    return loss + lm.router_aux_loss_coef * aux_loss.to(loss.device)


def router_aux_loss(lm, router_logits, attention_mask):
    """The load-balancing loss of a mixture-of-experts model from its routers' logits, by the model's own
    `load_balancing_loss_func` (each MoE modeling module defines one with the same signature)."""
    import sys

    func = sys.modules[type(lm).__module__].load_balancing_loss_func
    return func(router_logits, lm.num_experts, lm.num_experts_per_tok, attention_mask)


def base_causal_lm(model):
    """The `*ForCausalLM` module inside PEFT (and Unsloth) wrappers."""
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def shift_left(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> (B, T): position t holds the label of token t+1, the last is ignored.
    Shifting the labels (not the logits or hidden states) keeps those a free view."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


@dataclass
class LossRoute:
    """The resolved loss of a run: what `compute_loss` calls, and what the run directory records."""

    kernel: str  # fastsft-linear | fastsft | torch | unsloth
    kernel_backend: str  # triton | torch (for the fastsft kernels), "-" otherwise
    model_backend: str  # transformers | unsloth
    label_smoothing: float
    arch: str
    reason: str
    # fastsft-linear by replacing the causal LM's forward on the Unsloth backend too: its full fine-tuning
    # (FastModel) forward ignores UNSLOTH_RETURN_HIDDEN_STATES, and there is no PEFT wrapper in the way
    patch_forward: bool = False

    @property
    def implementation(self) -> str:
        return {
            "fastsft-linear": f"fastsft.kernels.fused_linear_cross_entropy (backend={self.kernel_backend})",
            "fastsft": f"fastsft.kernels.fused_cross_entropy (backend={self.kernel_backend})",
            "torch": "torch.nn.functional.cross_entropy on float32 logits (stock)",
            "unsloth": "unsloth_zoo fused CE loss (Unsloth's own)",
        }[self.kernel]

    def describe(self) -> dict:
        return {
            "kernel": self.kernel,
            "implementation": self.implementation,
            "kernel_backend": self.kernel_backend,
            "model_backend": self.model_backend,
            "architecture": self.arch,
            "label_smoothing": self.label_smoothing,
            "reason": self.reason,
        }

    @property
    def patches_forward(self) -> bool:
        return self.model_backend == "transformers" or self.patch_forward

    # ------------------------------------------------------------------------------------------
    # Installing the route on a model
    # ------------------------------------------------------------------------------------------

    def install(self, model) -> None:
        """Patch the model where the route needs it (transformers backend, fastsft-linear only)."""
        if self.kernel != "fastsft-linear" or not self.patches_forward:
            return
        lm = base_causal_lm(model)
        spec = ARCHITECTURES[type(lm).__name__]
        if getattr(lm, "_fastsft_original_forward", None) is None:
            lm._fastsft_original_forward = lm.forward
        lm._fastsft_route = self
        lm._fastsft_spec = spec
        lm.forward = types.MethodType(_linear_loss_forward, lm)

    def linear_loss(self, hidden, head, shifted_labels, num_items_in_batch, softcap) -> torch.Tensor:
        """The fused linear loss of hidden states (B, T, H) through `head` against labels already shifted
        left: mean over the micro-batch's tokens, or the sum / `num_items_in_batch` under accumulation."""
        return fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            head_weight(head),
            shifted_labels.reshape(-1),
            bias=head.bias,
            label_smoothing=self.label_smoothing,
            reduction="mean" if num_items_in_batch is None else "sum",
            num_items_in_batch=num_items_in_batch,
            softcap=softcap,
            backend=self.kernel_backend,
        )

    # ------------------------------------------------------------------------------------------
    # The loss of one micro-batch
    # ------------------------------------------------------------------------------------------

    def __call__(self, model, inputs: dict, num_items_in_batch=None):
        """-> (loss, outputs). `inputs` is the collated batch with `labels` (B, T)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        if self.kernel == "fastsft-linear" and self.patches_forward:
            out = model(**inputs, labels=labels, num_items_in_batch=num_items_in_batch)
            return out.loss, out
        if self.kernel == "unsloth":
            out = model(**inputs, labels=labels, num_items_in_batch=num_items_in_batch)
            return out.loss, out
        if self.kernel == "fastsft-linear":  # unsloth backend: hidden states out, our loss here
            with _env(UNSLOTH_RETURN_HIDDEN_STATES="1"):
                out = model(**inputs)
            lm = base_causal_lm(model)
            head = lm.lm_head
            hidden = out.logits
            if hidden.shape[-1] != head.weight.shape[1]:
                # some Unsloth forwards (its compiled FastModel path) ignore the variable and return logits
                raise BackendError(
                    f"Unsloth's forward for {type(lm).__name__} returned {hidden.shape[-1]} features, not the "
                    f"hidden size {head.weight.shape[1]}: it ignores UNSLOTH_RETURN_HIDDEN_STATES. "
                    'Use [loss] kernel = "fastsft" (logits in) for this model.'
                )
            if hidden.dtype == torch.float32 and head.weight.dtype in (torch.bfloat16, torch.float16):
                # the Trainer's mixed precision (accelerate) upcasts a 16-bit model's outputs to float32 on
                # the way out: back to the head's dtype (what the model's own head would compute in), or
                # the kernel would copy the lm_head to float32 and run the largest matmul in float32
                hidden = hidden.to(head.weight.dtype)
            softcap = getattr(lm.config, "final_logit_softcapping", None)
            loss = self.linear_loss(hidden, head, shift_left(labels), num_items_in_batch, softcap)
            # a fresh output: ModelOutput ignores `out.logits = None`, and the hidden states must never
            # reach anything that reads them as logits (the Trainer's prediction step, metrics)
            from transformers.modeling_outputs import CausalLMOutputWithPast

            return loss, CausalLMOutputWithPast(loss=loss, logits=None)
        # fastsft and torch on the transformers backend, fastsft on unsloth: logits out, loss here.
        ctx = _env(UNSLOTH_RETURN_LOGITS="1") if self.model_backend == "unsloth" else contextlib.nullcontext()
        with ctx:
            out = model(**inputs)
        logits = out.logits
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_labels = shift_left(labels).reshape(-1)
        if self.kernel == "fastsft":
            loss = fused_cross_entropy(
                flat_logits,
                flat_labels,
                label_smoothing=self.label_smoothing,
                reduction="mean" if num_items_in_batch is None else "sum",
                num_items_in_batch=num_items_in_batch,
                backend=self.kernel_backend,
                # in training nothing reads the logits after the loss: the gradient goes over them
                inplace_backward=model.training and logits.requires_grad,
            )
        else:
            loss = stock_loss(flat_logits, flat_labels, self.label_smoothing, num_items_in_batch)
        return with_router_aux(base_causal_lm(model), loss, getattr(out, "aux_loss", None)), out


def head_weight(head) -> torch.Tensor:
    """The lm_head's whole weight [V, H]. Under FSDP2 a module's parameters are DTensor shards, gathered
    by FSDP's hooks only around a module's own forward: the linear loss reads the weight without calling
    the head, so it gathers it here (`full_tensor()` all-gathers the rows, and its backward hands each
    rank the gradient of its own shard)."""
    w = head.weight
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def stock_loss(logits, labels, label_smoothing: float, num_items_in_batch=None) -> torch.Tensor:
    """What transformers' ForCausalLMLoss does (float32 upcast, cross_entropy), with label smoothing."""
    logits = logits.float()
    if num_items_in_batch is None:
        if bool((labels == IGNORE_INDEX).all()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    total = F.cross_entropy(
        logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
    )
    return total / num_items_in_batch


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _linear_loss_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    num_items_in_batch=None,
    shift_labels=None,
    output_router_logits=None,
    **kwargs,
):
    """`*ForCausalLM.forward` with the loss from hidden states: no full logits in training.
    Without labels it is the model's own forward (generation, logits for evaluation)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None and shift_labels is None:
        return self._fastsft_original_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    route: LossRoute = self._fastsft_route
    spec: ArchSpec = self._fastsft_spec
    if spec.router_aux:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        kwargs["output_router_logits"] = output_router_logits
    outputs = getattr(self, spec.backbone)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = shift_left(labels)
    head = getattr(self, spec.head)
    softcap = getattr(self.config, spec.softcap_attr, None) if spec.softcap_attr else None
    loss = route.linear_loss(hidden, head, shift_labels, num_items_in_batch, softcap)
    if spec.router_aux and output_router_logits:
        aux = router_aux_loss(self, outputs.router_logits, attention_mask)
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast

        return MoeCausalLMOutputWithPast(
            loss=with_router_aux(self, loss, aux),
            aux_loss=aux,
            logits=None,
            past_key_values=outputs.past_key_values,
        )
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)


def resolve(recipe, model, model_backend: str, device: torch.device) -> LossRoute:
    """`[loss]` + the loaded model -> the route this run uses, with the reason."""
    requested = recipe.loss.kernel
    arch = type(base_causal_lm(model)).__name__
    supported = arch in ARCHITECTURES
    if requested == "auto":
        kernel = "fastsft-linear" if supported else "fastsft"
        reason = (
            f"auto: {arch} is supported by the linear loss"
            if supported
            else f"auto: {arch} has no linear-loss patch yet, so the logits-in kernel"
        )
    else:
        kernel, reason = requested, "the recipe asks for it"
        if kernel == "fastsft-linear" and not supported:
            kernel, reason = (
                "fastsft",
                f"{arch} has no linear-loss patch yet; falling back to fastsft (logits in)",
            )
    if (
        kernel == "fastsft-linear"
        and dist.sharded(recipe)
        and recipe.distributed.strategy == "deepspeed-zero3"
    ):
        kernel = "fastsft"
        reason += (
            "; under DeepSpeed ZeRO-3 the lm_head's weight is gathered only inside the head's own forward, "
            "which the linear loss skips: the logits-in kernel"
        )
    if kernel == "unsloth" and model_backend != "unsloth":
        raise RecipeError('[loss] kernel = "unsloth" needs the unsloth backend')
    if kernel in ("fastsft", "fastsft-linear"):
        kb = "triton" if triton_available(device) else "torch"
        if kb == "torch":
            reason += (
                "; Triton cannot run here (no CUDA, TRITON_INTERPRET unset), so its chunked PyTorch twin"
            )
    else:
        kb = "-"
    patch = kernel == "fastsft-linear" and model_backend == "unsloth" and not hasattr(model, "peft_config")
    if patch:
        reason += (
            "; Unsloth full fine-tuning: the linear loss replaces the causal LM's forward, as on transformers"
        )
    return LossRoute(
        kernel, kb, model_backend, recipe.loss.label_smoothing, arch, reason, patch_forward=patch
    )
