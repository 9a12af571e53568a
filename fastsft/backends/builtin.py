"""Built-in tiny models for offline use: `name = "builtin:tiny-mistral"`.

A tiny model is a real architecture config (Mistral, Llama, Qwen2, Gemma 2) with random weights and a
byte-level BPE tokenizer trained here on the demo data, with a ChatML template whose assistant turns
carry `{% generation %}` markers. It is materialised once into a cache folder (safetensors) and then
loaded through the same loading code as any local model, so the tiny runs test the real path.

The demo data is synthetic and learnable: questions about objects whose answers follow a fixed
pattern ("What colour is a banana?" -> "A banana is yellow."), so the loss falls clearly in a
minute and the answers visibly change. `recipes/data/demo.jsonl` is `demo_rows()` written out.
"""

from __future__ import annotations

import random
from pathlib import Path

from .. import machine
from ..chat.templates import CHATML
from ..errors import BackendError
from ..files import cache_lock, new_dir

BUILTIN_PREFIX = "builtin:"
# Bump when the way a tiny model is made changes, so stale caches are never reused.
BUILTIN_VERSION = "3"  # 3: the chatml template renders tools

# name -> (config class name, extra config kwargs). Real sizes in comments, as the real configs have them.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-mistral": ("MistralConfig", {}),
    "tiny-llama": ("LlamaConfig", {}),
    "tiny-qwen2": ("Qwen2Config", {}),
    "tiny-gemma2": (
        "Gemma2Config",
        {"head_dim": 16, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16},
    ),
}
_COMMON = dict(
    hidden_size=64,  # 4096 in Mistral-7B
    intermediate_size=128,  # 14336
    num_hidden_layers=2,  # 32
    num_attention_heads=4,  # 32
    num_key_value_heads=2,  # 8
    max_position_embeddings=1024,  # 32768
    tie_word_embeddings=False,
)
VOCAB_SIZE = 1024

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOT = "<|endoftext|>", None, "<|im_end|>"

# ----------------------------------------------------------------------------------------------
# The demo data
# ----------------------------------------------------------------------------------------------

_FACTS = {
    # object: (colour, sound-or-None, where it lives/is found)
    "banana": ("yellow", None, "kitchen"),
    "apple": ("red", None, "kitchen"),
    "lemon": ("yellow", None, "kitchen"),
    "lime": ("green", None, "kitchen"),
    "plum": ("purple", None, "kitchen"),
    "carrot": ("orange", None, "garden"),
    "tomato": ("red", None, "garden"),
    "cucumber": ("green", None, "garden"),
    "cow": ("brown", "moo", "farm"),
    "sheep": ("white", "baa", "farm"),
    "pig": ("pink", "oink", "farm"),
    "duck": ("white", "quack", "pond"),
    "frog": ("green", "croak", "pond"),
    "dog": ("brown", "woof", "house"),
    "cat": ("black", "meow", "house"),
    "mouse": ("grey", "squeak", "house"),
    "lion": ("gold", "roar", "savanna"),
    "owl": ("brown", "hoot", "forest"),
    "crow": ("black", "caw", "forest"),
    "bee": ("yellow", "buzz", "garden"),
    "snake": ("green", "hiss", "forest"),
    "horse": ("brown", "neigh", "farm"),
    "goat": ("white", "bleat", "farm"),
    "wolf": ("grey", "howl", "forest"),
    "sky": ("blue", None, "world"),
    "grass": ("green", None, "garden"),
    "snow": ("white", None, "mountain"),
    "coal": ("black", None, "mine"),
    "ruby": ("red", None, "mine"),
    "sapphire": ("blue", None, "mine"),
}

_SYSTEM = "You answer in one short sentence."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _qa(obj: str, rng: random.Random) -> tuple[str, str]:
    colour, sound, place = _FACTS[obj]
    kinds = ["colour", "place"] + (["sound"] if sound else [])
    kind = rng.choice(kinds)
    a = _article(obj)
    if kind == "colour":
        q = rng.choice(
            [f"What colour is {a} {obj}?", f"Which colour does {a} {obj} have?", f"Colour of {a} {obj}?"]
        )
        ans = f"{a.capitalize()} {obj} is {colour}."
    elif kind == "sound":
        q = rng.choice([f"What sound does {a} {obj} make?", f"What does {a} {obj} say?"])
        ans = f"{a.capitalize()} {obj} says {sound}."
    else:
        q = rng.choice([f"Where do you find {a} {obj}?", f"Where is {a} {obj} found?"])
        ans = f"You find {a} {obj} in the {place}."
    return q, ans


def demo_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """The demo data set: `n` conversations in the `messages` shape. About a fifth have a system
    prompt and a fifth have two exchanges, so the assistant-only masks are exercised."""
    rng = random.Random(seed)
    objs = sorted(_FACTS)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": _SYSTEM})
        for _turn in range(2 if rng.random() < 0.2 else 1):
            q, a = _qa(rng.choice(objs), rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages})
    return rows


def chatml_template() -> str:
    return CHATML


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + n for n in TINY_CONFIGS]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template = chatml_template()
    texts = []
    for row in demo_rows(2000, seed=1):
        texts.append(" ".join(m["content"] for m in row["messages"]))
    texts += ["user assistant system tool", _SYSTEM]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        pad_token=PAD,
        unk_token=None,
        model_max_length=_COMMON["max_position_embeddings"],
    )
    hf.chat_template = template
    return hf


def materialize(name: str) -> Path:
    """Make (once) and return the folder of builtin model `name` ("builtin:tiny-mistral")."""
    import torch
    import transformers

    short = name[len(BUILTIN_PREFIX) :] if is_builtin(name) else name
    if short not in TINY_CONFIGS:
        raise BackendError(
            f"unknown built-in model {name!r}; built-in models are: {', '.join(builtin_names())}"
        )
    folder = machine.cache_root() / "builtin" / f"{short}-v{BUILTIN_VERSION}"
    if (folder / "config.json").exists():
        return folder
    with cache_lock(folder):  # the ranks of a run on a cold cache: one makes it, the others wait
        if (folder / "config.json").exists():
            return folder
        with new_dir(folder, complete="config.json") as tmp:
            tokenizer = _train_tokenizer()
            cls_name, extra = TINY_CONFIGS[short]
            config_cls = getattr(transformers, cls_name)
            config = config_cls(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
                **{**_COMMON, **extra},
            )
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            # A trained lm_head has rows far longer than the 0.02 init: with the final norm frozen, the
            # init's head bounds every logit to about +-1 and no LoRA can make the model confident.
            with torch.no_grad():
                model.get_output_embeddings().weight.normal_(0.0, 2.0 / config.hidden_size**0.5)
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return folder
