"""What every backend and every loader of a trained model share: the load policy, dtypes, the
tokenizer loader and the check of `target_modules`. A leaf: it imports nothing of fastsft but errors,
so the backends (transformers.py, unsloth.py) and the package __init__ import it, never each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - a broken torch install
        return False


def compute_dtype(requested: str) -> str:
    """`[model] dtype` -> "bf16" | "fp16" | "fp32" for this machine."""
    if requested != "auto":
        if requested in ("bf16", "fp16") and not cuda_available():
            return requested  # allowed (slow on CPU), the user asked
        return requested
    if not cuda_available():
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def float32_trainable(model, dtype: str):
    """Under fp16 the trainable weights are float32, computing in fp16 under the Trainer's autocast, as
    the Trainer expects: its GradScaler refuses fp16 gradients ("Attempting to unscale FP16 gradients"),
    and an fp16 weight cannot take an Adam step smaller than its precision. That is every weight in full
    fine-tuning and PEFT's `modules_to_save` copies (PEFT keeps them in the base's fp16; LoRA's own
    matrices it already makes float32). bf16 and fp32 need no scaler: the weights are left as they are."""
    import torch

    if dtype == "fp16":
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()  # the same Parameter: tied weights stay tied
    return model


@dataclass(frozen=True)
class LoadPolicy:
    """What loading a model may do. Granted on the command line only (`--trust-remote-code`,
    `--allow-pickle`), never by a recipe or a folder someone sent: a run directory's recipe.toml says
    what its model needs, and every command that loads a model (run, generate, chat, eval, export,
    serve) goes through this one policy.

    - trust_remote_code: let transformers import and run Python code shipped with the model.
    - allow_pickle: read pickle weights (.bin/.pt), which can run code when loaded; otherwise only
      safetensors are read.
    """

    trust_remote_code: bool = False
    allow_pickle: bool = False

    def check_recipe(self, recipe, where: str | None = None) -> None:
        """BackendError when the recipe's model needs a permission this policy does not grant."""
        where = where or (str(recipe.path) if getattr(recipe, "path", None) else "the recipe")
        if recipe.model.trust_remote_code and not self.trust_remote_code:
            raise BackendError(
                f"{where}: [model] trust_remote_code = true: loading {recipe.model.name!r} would run Python code "
                "from the model's repository. Nothing was loaded. If you trust that code, pass "
                "--trust-remote-code on the command line."
            )

    def check_weights(self, path, what: str = "the model") -> None:
        """BackendError when folder `path` holds only pickle weights and pickle is not allowed."""
        p = Path(path)
        if self.allow_pickle or not p.is_dir():
            return
        pickles = sorted(
            x.name
            for x in p.iterdir()
            if x.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt") and x.name not in ("training_args.bin",)
        )
        if pickles and not any(p.glob("*.safetensors")):
            raise BackendError(
                f"{what} in {p} has only pickle weights ({', '.join(pickles[:3])}), which can run code when "
                "loaded; nothing was loaded. Convert them to safetensors, or pass --allow-pickle if you trust "
                "the files."
            )

    @staticmethod
    def refused_pickle(error: Exception, path, what: str = "the model") -> BackendError:
        """The error for a pickle file that torch's safe loader (`torch.load(weights_only=True)`, which
        transformers uses even with --allow-pickle) refuses: it names objects that are not plain tensors,
        such as a function to call."""
        lines = [x.strip() for x in str(error).splitlines() if x.strip()]
        why = next(
            (x for x in lines if x.startswith("Trying to load") or "GLOBAL" in x), lines[-1] if lines else ""
        )
        return BackendError(
            f"{what} in {path}: torch's safe loader refused a pickle weight file ({why.rstrip('.')}). A pickle that holds "
            "more than tensors can run code when loaded, and --allow-pickle reads only pickles of plain tensors. "
            "Nothing was loaded. Use safetensors weights for this model (from its publisher), or convert the "
            "file on a machine where you trust it."
        )

    def from_pretrained_kwargs(self) -> dict:
        """trust_remote_code and use_safetensors for `from_pretrained`."""
        return {
            "trust_remote_code": self.trust_remote_code,
            "use_safetensors": None if self.allow_pickle else True,
        }


def tokenizer_from(*folders, policy: LoadPolicy | None = None):
    """The first of `folders` whose tokenizer loads (a run's adapter folder carries the chat template and
    any token training added, so it comes before the base model's folder). None entries are skipped, and
    so is a folder without tokenizer files while another is left to try."""
    from transformers import AutoTokenizer

    policy = policy or LoadPolicy()
    tried = [str(f) for f in folders if f is not None]
    last = None
    for n, folder in enumerate(tried):
        p = Path(folder)
        if n < len(tried) - 1 and p.is_dir() and not any(p.glob("tokenizer*")):
            continue
        try:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=policy.trust_remote_code)
        except (OSError, ValueError) as e:
            last = e
    if len(tried) == 1:
        raise BackendError(f"cannot load the tokenizer of {tried[0]!r}: {last}")
    raise BackendError(f"cannot load a tokenizer from {', '.join(tried)}: {last}")


def check_target_modules(model, targets, *, where: str = "[lora] target_modules") -> None:
    """Every name in a `target_modules` list must name a module of `model` (PEFT silently skips a
    misspelt one when another matches, and trains an adapter without it)."""
    import difflib

    if isinstance(targets, str):
        return  # "all-linear" (or a regex, which PEFT matches itself)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [
        t
        for t in targets
        if t not in names and not any(n.endswith(f".{t}") or n == t for n, _ in model.named_modules())
    ]
    if not missing:
        return
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.startswith("Linear")}
        - {"lm_head"}
    )
    hints = []
    for t in missing:
        close = difflib.get_close_matches(t, linear, n=1, cutoff=0.6)
        hints.append(f"{t!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise BackendError(
        f"{where}: {', '.join(hints)} match{'es' if len(missing) == 1 else ''} no module of the model, so "
        f"{'it' if len(missing) == 1 else 'they'} would get no adapter. The model's linear layers are: "
        f'{", ".join(linear)} (or use "all-linear").'
    )


__all__ = [
    "LoadPolicy",
    "check_target_modules",
    "fit_embeddings",
    "compute_dtype",
    "cuda_available",
    "tokenizer_from",
    "torch_dtype",
]


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the model's token embeddings (and tied head) to the tokenizer's length, as training did when
    it added a pad token (data's `<|pad|>`): the run's adapter and tokenizer hold ids the base model's
    matrix has no row for. Returns whether it resized."""
    if len(tokenizer) <= model.get_input_embeddings().num_embeddings:
        return False
    model.resize_token_embeddings(len(tokenizer))
    return True
