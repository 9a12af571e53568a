"""One end-to-end training row, in its own process (Unsloth patches transformers when imported, so
rows must not share a process).

    python benchmarks/_train_worker.py ROW MODEL_DIR DATA_JSONL SEQ_LEN STEPS WARMUP OUT_JSON

ROW: fastsft (Unsloth backend + our loss), fastsft-transformers (transformers backend + our loss),
transformers (stock: AutoModelForCausalLM + bitsandbytes NF4 + PEFT + SDPA + TRL SFTTrainer, no
fastsft code), unsloth (FastLanguageModel + its own loss). Same recipe for all: 4-bit NF4 base with
double quantisation, LoRA r=16 / alpha=16 on all linear layers, gradient checkpointing, batch 1, no
accumulation, lr 2e-4, data of exactly SEQ_LEN tokens per row, no packing, loss on every token.
With FASTSFT_BENCH_LORA16=1 (the CPU row) the base is bf16 (16-bit LoRA, bf16 mixed precision)
instead of NF4, for fastsft and the plain TRL script alike, and the record holds the peak resident
set of the process (VmHWM) where there is no GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timing_callback(warmup: int, record: dict):
    """Times steps warmup+1..end, counts the tokens the trainer reports, takes the peak at the end."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and "t0" not in record:
                _sync()
                record["t0"] = time.perf_counter()
                record["tokens0"] = record.get("num_tokens")
                _reset_peak()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                record.setdefault("losses", []).append(round(float(logs["loss"]), 4))
                if "num_tokens" in logs:
                    record["num_tokens"] = float(logs["num_tokens"])

        def on_train_end(self, args, state, control, **kw):
            _sync()
            record["t1"] = time.perf_counter()
            record["steps"] = state.global_step
            record["peak_mem_gib"] = _peak()
            record["peak_rss_gib"] = _peak_rss()

    return Timing()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _peak_rss():
    """GiB: the process's peak resident set (model, data, training), from /proc (None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return None


LORA16 = os.environ.get("FASTSFT_BENCH_LORA16") == "1"


def run_fastsft(row, model_dir, data, seq_len, steps, warmup, record):
    from fastsft import recipe as R
    from fastsft.run import train

    backend = "unsloth" if row == "fastsft" else "transformers"
    quant, dtype = ("false", 'dtype = "bf16"') if LORA16 else ("true", "")
    text = f"""
[model]
name = "{model_dir}"
backend = "{backend}"
load_in_4bit = {quant}
{dtype}
[lora]
r = 16
lora_alpha = 16
target_modules = "all-linear"
[data]
train = "{data}"
format = "text"
max_length = {seq_len}
[train]
max_steps = {steps}
per_device_train_batch_size = 1
learning_rate = 2e-4
gradient_checkpointing = true
logging_steps = 1
save_strategy = "no"
seed = 0
"""
    recipe = R.validate(R.parse(text), path=None)
    import tempfile

    result = train.run(
        recipe, output_dir=tempfile.mkdtemp(prefix="bench-run-"), callbacks=[timing_callback(warmup, record)]
    )
    loss = result.summary.get("loss")
    record["loss_impl"] = loss.get("implementation") if isinstance(loss, dict) else loss
    record["used_backend"] = result.summary.get("backend")
    if record["used_backend"] != backend:
        raise RuntimeError(f"asked for backend {backend!r}, fastsft used {record['used_backend']!r}")


def run_stock(model_dir, data, seq_len, steps, warmup, record):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(0)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda or LORA16 else torch.float32
    quant = None
    if not LORA16:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        attn_implementation="sdpa",
        quantization_config=quant,
        device_map={"": 0} if cuda else None,
    )
    if LORA16:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(
        output_dir=f"/tmp/bench-stock-{time.time_ns()}",
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=2e-4,
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=seq_len,
        bf16=cuda or LORA16,
        use_cpu=not cuda,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataset_text_field="text",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        callbacks=[timing_callback(warmup, record)],
    )
    trainer.train()
    record["loss_impl"] = "TRL SFTTrainer's own loss"
    record["used_backend"] = "transformers"


def run_unsloth(model_dir, data, seq_len, steps, warmup, record):
    from unsloth import FastLanguageModel  # first: Unsloth patches transformers, trl and peft on import

    # isort: split
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    class UnslothOwnLoss(SFTTrainer):
        """TRL's SFTTrainer computes its loss through its own chunked lm-head (add_fused_lm_head); the
        model called with labels runs Unsloth's forward and its fused loss instead, as Unsloth users get."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs, num_items_in_batch=num_items_in_batch)
            return (out.loss, out) if return_outputs else out.loss

    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq_len, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        target_modules=ALL_LINEAR,
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    ds = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(
        output_dir=f"/tmp/bench-unsloth-{time.time_ns()}",
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=seq_len,
        bf16=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataset_text_field="text",
    )
    trainer = UnslothOwnLoss(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        callbacks=[timing_callback(warmup, record)],
    )
    trainer.model_accepts_loss_kwargs = True  # the model divides by num_items_in_batch itself
    trainer.train()
    record["loss_impl"] = "unsloth's fused loss (model called with labels)"
    record["used_backend"] = "unsloth"


def _cap_memory():
    """FASTSFT_BENCH_MEM_GIB: let this process use at most that much GPU memory (the 24 GB search)."""
    import os

    gib = os.environ.get("FASTSFT_BENCH_MEM_GIB")
    if gib:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) * 2**30 / total), 0)


def main(argv):
    import importlib.util
    import traceback

    row, model_dir, data, seq_len, steps, warmup, out = argv
    seq_len, steps, warmup = int(seq_len), int(steps), int(warmup)
    record = {"row": row}
    needs = {"fastsft": "unsloth", "unsloth": "unsloth"}.get(row)
    try:
        if needs and importlib.util.find_spec(needs) is None:
            raise ImportError(name=needs)
        _cap_memory()
        if row in ("fastsft", "fastsft-transformers"):
            run_fastsft(row, model_dir, data, seq_len, steps, warmup, record)
        elif row == "transformers":
            run_stock(model_dir, data, seq_len, steps, warmup, record)
        elif row == "unsloth":
            run_unsloth(model_dir, data, seq_len, steps, warmup, record)
        else:
            raise SystemExit(f"unknown row {row}")
        timed = record["steps"] - warmup
        elapsed = record["t1"] - record["t0"]
        tokens = None
        if record.get("num_tokens") is not None and record.get("tokens0") is not None:
            tokens = record["num_tokens"] - record["tokens0"]  # what the trainer counted in the timed steps
        if tokens is None:
            tokens = timed * seq_len
        record["tokens_per_step"] = tokens / timed if timed > 0 else None
        record["tokens_per_s"] = tokens / elapsed if timed > 0 and elapsed > 0 else None
    except ImportError as e:
        if row == "fastsft-transformers":  # fastsft's own path must run wherever the benchmark runs
            raise
        record["skipped"] = f"not installed: {e.name or e}"
    except BaseException as e:  # noqa: BLE001 - the test decides; the record says what happened
        traceback.print_exc()
        text = f"{type(e).__name__}: {e}"
        record["error"] = text.strip().splitlines()[0][:500] if text.strip() else type(e).__name__
        record["oom"] = "out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError"
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1:])
