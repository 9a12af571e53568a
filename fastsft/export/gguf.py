"""The GGUF export: one BF16 / F16 / F32, Q8_0 or Q4_0 file for llama.cpp and Ollama, for Llama, Mistral
and Qwen2 models with a byte-level BPE tokenizer, written with the `gguf` package (its numpy quantizers,
`gguf.quants`) from the merged weights and read back to check it; named `<run>-<TYPE>.gguf`, with an
Ollama `Modelfile` beside it (the chat template and the end-of-turn stop tokens of the run).

Q8_0 and Q4_0 quantize every 2-D weight whose rows are whole 32-value blocks; Q4_0 keeps the token
embeddings and the output head in Q8_0 (they are the most sensitive, as llama.cpp's own Q4_0 keeps the
output at a higher type); norms and biases stay F32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastsft import files
from fastsft.chat.templates import end_of_turn_ids
from fastsft.errors import ExportError
from fastsft.export.merged import merge
from fastsft.export.read import RunInfo, _collect, _print
from fastsft.progress import bar, phase
from fastsft.recipe import GGUF_K_QUANTS

# HF architecture -> (llama.cpp architecture, whether q/k weights are permuted as convert_hf_to_gguf does)
GGUF_ARCHS = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}


def permute_qk(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's q/k permutation (convert_hf_to_gguf.LlamaModel.permute): HF's rotate-half layout ->
    GGML's interleaved rotary pairs. Works on torch tensors and numpy arrays (weights and biases)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _tokenizer_pre(tok_json: dict, arch: str) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for this tokenizer, and a warning when it is a guess."""
    pre = tok_json.get("pre_tokenizer") or {}
    if arch == "qwen2":
        return "qwen2", None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2", None
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            regex = (p.get("pattern") or {}).get("Regex", "")
            if p.get("type") == "Split" and regex.startswith(_LLAMA3_REGEX_START):
                return "llama-bpe", None
    return "default", "unrecognised pre-tokenizer: llama.cpp will split text with its default regex"


def _vocab(tokenizer, n_vocab: int):
    """(tokens, types) as convert_hf_to_gguf's BPE vocab: ids without a token become [PAD<id>] (unused)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


@dataclass
class _GGUFVocab:
    tokenizer: object
    tokens: list[str]
    types: list
    special: object  # gguf.SpecialVocab: merges, special token ids, chat template
    pre: str  # llama.cpp's pre-tokenizer name
    eot: list[int]


def _gguf_arch(run: RunInfo):
    """(config, HF architecture, llama.cpp architecture, permute q/k, rope scaling dict, its type), or
    an ExportError for what the GGUF writer does not handle."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run.base_path, trust_remote_code=run.trust_remote_code)
    hf_arch = (getattr(config, "architectures", None) or ["?"])[0]
    if hf_arch not in GGUF_ARCHS:
        raise ExportError(
            f"GGUF export supports {', '.join(GGUF_ARCHS)}; {run.base_path} is {hf_arch}. Export `merged` "
            "instead and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    arch, permute = GGUF_ARCHS[hf_arch]
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        (rope.get("rope_type") or rope.get("type") or "default") if isinstance(rope, dict) else "default"
    )
    if rope_type not in ("default", "linear"):
        raise ExportError(
            f"GGUF export does not handle rope scaling {rope_type!r} yet; "
            "export `merged` and convert it with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    return config, hf_arch, arch, permute, rope, rope_type


def _gguf_vocab(run: RunInfo, n_vocab: int, arch: str, console=None) -> _GGUFVocab:
    """The run's tokenizer as llama.cpp's byte-level BPE ("gpt2") vocabulary, or an ExportError."""
    import gguf

    tokenizer = run.tokenizer()
    with tempfile.TemporaryDirectory(prefix="fastsft-tok-") as tokdir:
        tokenizer.save_pretrained(tokdir)
        tj_path = Path(tokdir) / "tokenizer.json"
        tok_json = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.exists() else {}
        model_type = (tok_json.get("model") or {}).get("type")
        byte_level = (
            "ByteLevel" in json.dumps(tok_json.get("pre_tokenizer"))
            or (tok_json.get("decoder") or {}).get("type") == "ByteLevel"
        )
        if model_type != "BPE" or not byte_level:
            raise ExportError(
                'GGUF export writes byte-level BPE ("gpt2") tokenizers; '
                f"this one is {model_type or 'not a tokenizer.json'}"
                f"{'' if byte_level else ' without byte-level pre-tokenisation'}. "
                "Export `merged` and convert it with "
                "llama.cpp's convert_hf_to_gguf.py."
            )
        tokens, types = _vocab(tokenizer, n_vocab)
        if len(tokenizer) > n_vocab:
            raise ExportError(
                f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings."
            )
        special = gguf.SpecialVocab(tokdir, load_merges=True, n_vocab=n_vocab)
    pre, pre_warning = _tokenizer_pre(tok_json, arch)
    if pre_warning:
        _print(console, f"warning: {pre_warning}", style="yellow")
    return _GGUFVocab(tokenizer, tokens, types, special, pre, end_of_turn_ids(tokenizer))


def _gguf_header(writer, config, vocab: _GGUFVocab, *, dtype: str, rope: dict, rope_type: str) -> None:
    """The model's hyperparameters and tokenizer as GGUF metadata."""
    import gguf

    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope.get("factor", 1.0)))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(
        {
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "fp16": gguf.LlamaFileType.MOSTLY_F16,
            "fp32": gguf.LlamaFileType.ALL_F32,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[dtype]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)
    tokenizer = vocab.tokenizer
    if vocab.special.chat_template is None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    if vocab.eot and vocab.eot[0] != tokenizer.eos_token_id:
        writer.add_eot_token_id(vocab.eot[0])


def _gguf_tensors(
    writer, state: dict, config, *, arch_name: str, permute: bool, dtype: str, advance=None
) -> tuple[dict, dict]:
    """Add the merged model's tensors under llama.cpp's names (q/k permuted where llama.cpp expects it;
    1-D tensors in F32). Returns ({name: shape}, {name: first values as written}) for the read-back."""
    import gguf
    import numpy as np

    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    Q = gguf.GGMLQuantizationType
    qtype = {"bf16": Q.BF16, "fp16": Q.F16, "fp32": Q.F32, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]
    tmap = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch_name == "llama" else gguf.MODEL_ARCH.QWEN2,
        int(config.num_hidden_layers),
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected: dict[str, tuple[int, ...]] = {}
    samples: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        if (tied and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq"):
            continue
        gname = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(
                f"GGUF export: no llama.cpp name for tensor {key!r} of {config.architectures[0]}."
            )
        data = tensor.detach().float().cpu()
        if permute and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head, n_head)
        elif permute and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, n_head, n_kv)
        arr = data.numpy()
        # 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them.
        t_qtype = gguf.GGMLQuantizationType.F32 if arr.ndim == 1 else qtype
        if t_qtype in (Q.Q8_0, Q.Q4_0):
            if arr.shape[-1] % 32:  # rows that are not whole blocks: 16-bit
                t_qtype = Q.F16
            elif t_qtype == Q.Q4_0 and gname in ("token_embd.weight", "output.weight"):
                t_qtype = Q.Q8_0
        if advance is not None:
            advance()
        q = gguf.quants.quantize(arr, t_qtype)
        if t_qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gname, q)
        else:
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=t_qtype)
        expected[gname] = tuple(arr.shape)
        flat = arr.reshape(-1)
        samples[gname] = gguf.quants.dequantize(
            gguf.quants.quantize(flat[:64].copy(), t_qtype), t_qtype
        ).reshape(-1)
    return expected, samples


def export_gguf(run: RunInfo, out: Path, *, dtype: str, console=None) -> dict:
    """One GGUF file (llama.cpp) of the merged model in `dtype`, written with the `gguf` package and
    read back to check every tensor's shape and first values and the vocabulary. A K-quant (q4_k_m,
    q5_k_m, q6_k) is made from that F16 file by llama.cpp's own quantizer (llama-cpp-python)."""
    import gguf

    if dtype in GGUF_K_QUANTS:
        return _export_k_quant(run, out, dtype=dtype, console=console)
    config, hf_arch, arch, permute, rope, rope_type = _gguf_arch(run)
    vocab = _gguf_vocab(run, int(config.vocab_size), arch, console=console)
    file = out / gguf_name(run, dtype)
    writer = gguf.GGUFWriter(str(file), arch)
    writer.add_name(run.path.name)
    _gguf_header(writer, config, vocab, dtype=dtype, rope=rope, rope_type=rope_type)

    merged = merge(run, "fp32" if dtype in QUANTIZED else dtype)  # quantized from float32
    state = merged.state_dict()
    with bar(console, len(state), f"gguf {GGUF_TYPES[dtype]} tensors") as advance:
        expected, samples = _gguf_tensors(
            writer, state, config, arch_name=arch, permute=permute, dtype=dtype, advance=advance
        )
    del merged, state
    _collect()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    check = verify_gguf(file, expected, samples, n_tokens=len(vocab.tokens))
    _print(console, f"gguf: {file.name}: {check['tensors']} tensors, {arch}, {dtype}; read back and checked")
    modelfile = write_modelfile(out, file.name, vocab)
    return {
        "file": file.name,
        "type": GGUF_TYPES[dtype],
        "modelfile": modelfile,
        "arch": arch,
        "hf_arch": hf_arch,
        "tokenizer_pre": vocab.pre,
        "permuted_qk": permute,
        "end_of_turn_ids": vocab.eot,
        "verify": check,
    }


GGUF_TYPES = {
    "bf16": "BF16",
    "fp16": "F16",
    "fp32": "F32",
    "q8_0": "Q8_0",
    "q4_0": "Q4_0",
    "q4_k_m": "Q4_K_M",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
}  # llama.cpp's names
QUANTIZED = ("q8_0", "q4_0")  # written by fastsft (gguf.quants); the K-quants by llama.cpp
LLAMA_FTYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}  # llama-cpp-python's names of llama.cpp's file types


def llama_cpp_quantizer(dtype: str):
    """llama-cpp-python's module (llama.cpp's quantizer), or an ExportError saying how to get it."""
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or a build whose shared library does not load
        raise ExportError(
            f"--dtype {dtype} is one of llama.cpp's K-quants, made by llama.cpp's own quantizer, and "
            f"llama-cpp-python cannot be imported here ({type(e).__name__}: {e}). Install it "
            "(pip install llama-cpp-python: it builds llama.cpp, minutes), or use --dtype q8_0 or q4_0, "
            "which fastsft writes itself."
        ) from None
    return llama_cpp


def _export_k_quant(run: RunInfo, out: Path, *, dtype: str, console=None) -> dict:
    """The F16 GGUF (written and checked as any other), quantized by llama.cpp's `llama_model_quantize`
    into `<run>-<TYPE>.gguf`; the F16 file is removed. Tensors whose rows are not whole 256-value blocks
    get the fallback type llama.cpp's quantizer picks."""
    import ctypes
    import os

    import gguf

    llama_cpp = llama_cpp_quantizer(dtype)
    f16 = export_gguf(run, out, dtype="fp16", console=console)
    source, file = out / f16["file"], out / gguf_name(run, dtype)
    written = {t.name: tuple(t.shape.tolist()) for t in gguf.GGUFReader(str(source)).tensors}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[dtype])
    params.nthread = os.cpu_count() or 1
    _print(console, f"gguf: quantizing {source.name} to {GGUF_TYPES[dtype]} with llama.cpp")
    with phase(
        console, f"gguf: quantizing to {GGUF_TYPES[dtype]}"
    ):  # lines off a terminal (ctypes frees the GIL)
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(file).encode(), ctypes.byref(params))
    source.unlink()
    if rc != 0 or not file.exists():
        raise ExportError(
            f"llama.cpp's quantizer could not make {file.name} (--dtype {dtype}): it returned {rc}."
        )
    reader = gguf.GGUFReader(str(file))
    back = {t.name: tuple(t.shape.tolist()) for t in reader.tensors}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    if back != written:
        raise ExportError(f"GGUF read-back of {file.name}: its tensors or shapes differ from the F16 file's.")
    _print(console, f"gguf: {file.name}: {len(back)} tensors, block types {', '.join(types)}")
    modelfile = (out / "Modelfile").read_text(encoding="utf-8").replace(source.name, file.name)
    files.write_text(out / "Modelfile", modelfile)
    version = getattr(llama_cpp, "__version__", "?")
    return {
        **f16,
        "file": file.name,
        "type": GGUF_TYPES[dtype],
        "quantized_by": f"llama.cpp (llama-cpp-python {version}) from the F16 file",
        "tensor_types": types,
    }


def gguf_name(run: RunInfo, dtype: str) -> str:
    """`<run>-<TYPE>.gguf`: the run folder's name and llama.cpp's type name (tiny-Q4_0.gguf)."""
    return f"{run.path.name}-{GGUF_TYPES[dtype]}.gguf"


# Ollama's Go templates for the chat formats fastsft's templates write (recognised by their markers).
_OLLAMA_TEMPLATES = {
    "<|im_start|>": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "<|start_header_id|>": (
        "<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "[INST]": (
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}'
    ),
}


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the tokenizer's chat template writes when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM..."; fastsft's ChatML template's `default_system`), or
    None. Found by rendering one user turn with and without a system turn: the text the template puts
    where the system message goes."""
    user = [{"role": "user", "content": "FASTSFT-USER-7f3a"}]
    marker = "FASTSFT-SYSTEM-7f3a"
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, *user], tokenize=False
        )
        without = tokenizer.apply_chat_template(user, tokenize=False)
    except Exception:  # no template, or one that refuses a system turn (Jinja raises anything)
        return None
    if not isinstance(with_system, str) or marker not in with_system:
        return None
    head, tail = with_system.split(marker, 1)
    if not (without.startswith(head) and without.endswith(tail)) or len(without) < len(head) + len(tail):
        return None
    text = without[len(head) : len(without) - len(tail)].strip()
    return text or None


def modelfile_text(
    gguf_file: str, chat_template: str | None, stops: list[str], system: str | None = None
) -> str:
    """An Ollama Modelfile for `gguf_file`: FROM, the chat template as Ollama's Go template (for ChatML,
    Llama 3 and Mistral templates; otherwise Ollama reads the GGUF's own tokenizer.chat_template), the
    system prompt training used when the conversation had none (`system`: the template's default), the
    end-of-turn tokens as stop parameters, and greedy decoding as fastsft answers."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_file}"]
    template = next((t for marker, t in _OLLAMA_TEMPLATES.items() if marker in (chat_template or "")), None)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF file")
    if system:
        lines.append("# the system prompt the chat template wrote in training when a conversation had none")
        lines.append(f'SYSTEM """{system.replace(chr(34) * 3, chr(39) * 3)}"""')
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_modelfile(out: Path, gguf_file: str, vocab: _GGUFVocab) -> str:
    """Modelfile beside the GGUF file; returns its name."""
    tok = vocab.tokenizer
    stops = [tok.convert_ids_to_tokens(i) for i in vocab.eot]
    text = modelfile_text(
        gguf_file, getattr(tok, "chat_template", None), stops, system=default_system_prompt(tok)
    )
    files.write_text(out / "Modelfile", text)
    return "Modelfile"


def verify_gguf(file: Path, expected: dict, samples: dict, *, n_tokens: int) -> dict:
    """Read the file back: every tensor present with its shape, sample values equal, vocab complete."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:
        raise ExportError(f"the GGUF file {file.name} cannot be read back: {e}") from None
    got = {t.name: t for t in reader.tensors}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ExportError(f"GGUF read-back: missing tensors {missing}, unexpected {extra}")
    worst = 0.0
    for name, shape in expected.items():
        t = got[name]
        shape_back = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGML lists dimensions fastest first
        if shape_back != shape:
            raise ExportError(f"GGUF read-back: {name} has shape {shape_back}, expected {shape}")
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)[: len(samples[name])]
        diff = float(np.max(np.abs(values - samples[name]))) if len(values) else 0.0
        worst = max(worst, diff)
        if diff != 0.0:
            raise ExportError(
                f"GGUF read-back: values of {name} differ from what was written (max {diff:.3e})"
            )
    field = reader.get_field("tokenizer.ggml.tokens")
    n_back = len(field.data) if field is not None else 0
    if n_back != n_tokens:
        raise ExportError(f"GGUF read-back: {n_back} tokens, expected {n_tokens}")
    return {"tensors": len(expected), "tokens": n_back, "max_abs_diff": worst}
