"""Training data: read it, check and normalise its shape, tokenize and mask it, hand it to TRL.

read      files (.jsonl, .json, .parquet, .csv), save_to_disk folders, hub data sets -> raw rows,
          each named by its file and line
formats   shape detection and normalisation (text, messages, prompt/completion, conversations,
          sharegpt with tools, alpaca) -> TRL's forms; bad rows named or skipped
encode    chat template, pad token, tokenization and the loss masks (the one owner of masking:
          training, preview and eval all use it)
cache     the fingerprint of the prepared data and the tokenized-data cache
prepare   `prepare_data(recipe, tokenizer)`: the datasets SFTTrainer takes (input_ids + masks),
          the eval split, SFTConfig's data fields, stats; `encode_file` / `encode_eval_split` for eval
spec      `DataSpec`: the recipe's [data] as the pipeline reads it, built once; `one_file` reads another
          file exactly as training read data.train (sources, retain, eval --data)
preview   `fastsft data preview`: the first examples with their trained tokens highlighted
"""

from .cache import compute_fingerprint
from .encode import IGNORE_INDEX, labels
from .formats import FORMATS, detect_format, normalize, parse_messages, parse_tools
from .prepare import PreparedData, encode_eval_split, encode_file, prepare_data
from .preview import preview, preview_rows
from .read import MAX_ROW_BYTES, is_local, not_text
from .spec import DataSpec

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "MAX_ROW_BYTES",
    "DataSpec",
    "PreparedData",
    "compute_fingerprint",
    "detect_format",
    "encode_eval_split",
    "encode_file",
    "is_local",
    "labels",
    "normalize",
    "not_text",
    "parse_messages",
    "parse_tools",
    "prepare_data",
    "preview",
    "preview_rows",
]
