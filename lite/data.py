"""Calibration and evaluation text: named datasets from the hub, local files, and the shipped sample.

`--calib-dataset` takes a name from `DATASETS` or a path to a `.txt`, `.jsonl` (a `text` field per
line) or `.parquet` (a `text` column) file. Samples are non-overlapping windows of the tokenized text,
chosen at random with a fixed seed; each starts with BOS when the tokenizer has one, as the model
sees text at inference.
"""

import json
import os

import torch

from lite.errors import LiteError
from lite.folders import file_sha256

SAMPLE_TEXT = os.path.join(os.path.dirname(__file__), "data", "sample.txt")
RANDOM = "random"  # uniform random token ids: see `calibration_tokens`


def _hub(path, name, split, field, data_files=None):
    def load():
        import datasets

        try:
            ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
        except Exception as e:  # offline, unreachable or renamed on the hub: datasets raises many types
            raise LiteError(f"could not load the dataset {path} from the hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); pass a local text file "
                            "(--calib-dataset FILE.txt/.jsonl/.parquet) or `sample`") from e
        return "\n\n".join(row for row in ds[field] if row)

    return load


# name -> function returning the dataset's text; the splits lmdeploy and GPTQ calibrate on.
DATASETS = {
    "wikitext2": _hub("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": _hub("allenai/c4", None, "train", "text", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}),
    "pileval": _hub("mit-han-lab/pile-val-backup", None, "validation", "text"),
    "ptb": _hub("ptb_text_only", "penn_treebank", "train", "sentence"),
    "sample": lambda: read_text_file(SAMPLE_TEXT),
}

# The same datasets' held-out splits, for perplexity.
EVAL_DATASETS = {
    "wikitext2": _hub("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "c4": _hub("allenai/c4", None, "validation", "text",
               data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}),
    "ptb": _hub("ptb_text_only", "penn_treebank", "test", "sentence"),
    "sample": lambda: read_text_file(SAMPLE_TEXT),
}


def data_fingerprint(dataset: str) -> str | None:
    """sha256 of a local calibration file's bytes (the shipped sample included), so that an edited file
    is told apart from the one statistics were made from; None for hub datasets and `random`."""
    path = SAMPLE_TEXT if dataset == "sample" else dataset
    if dataset in DATASETS and dataset != "sample" or not os.path.isfile(path):
        return None
    return file_sha256(path)


def read_text_file(path: str) -> str:
    """Text of a `.txt`, `.jsonl` (`text` field) or `.parquet` (`text` column) file."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                return f.read()
        if ext == ".jsonl":
            return "\n\n".join(_jsonl_rows(path))
        if ext == ".parquet":
            return _parquet_text(path)
    except UnicodeDecodeError as e:
        raise LiteError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        "convert it to UTF-8 (e.g. iconv -t utf-8)") from None
    raise LiteError(f"{path}: unsupported text file type {ext!r}; use .txt, .jsonl or .parquet")


def _jsonl_rows(path: str) -> list[str]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise LiteError(f"{path} line {n} is not JSON ({e}); each line must be {{\"text\": ...}}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LiteError(f"{path} line {n} has no 'text' string field; each line must be {{\"text\": ...}}")
            rows.append(row["text"])
    return rows


def _parquet_text(path: str) -> str:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    except Exception as e:  # pyarrow raises its own types for a file that is not parquet
        raise LiteError(f"{path} could not be read as parquet ({type(e).__name__}); pass a valid .parquet file "
                        "with a 'text' column") from None
    if "text" not in ds.column_names:
        raise LiteError(f"{path} has no 'text' column (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds["text"] if isinstance(t, str) and t)


def check_dataset(dataset: str, eval_split: bool = False) -> None:
    """Refuse, before any work, a dataset that is neither a known name nor an existing file."""
    table = EVAL_DATASETS if eval_split else DATASETS
    if dataset not in table and dataset != RANDOM and not os.path.isfile(str(dataset)):
        raise LiteError(f"dataset {dataset!r} is neither a file nor one of: {', '.join(table)}")


def load_text(dataset: str, eval_split: bool = False) -> str:
    """The text of a named dataset or a local file."""
    check_dataset(dataset, eval_split)
    table = EVAL_DATASETS if eval_split else DATASETS
    return table[dataset]() if dataset in table else read_text_file(dataset)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a whole text, without special tokens, `(tokens,)`."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer, dataset: str, samples: int, seqlen: int, seed: int,
                       vocab_size: int | None = None) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens (BOS first when the tokenizer has one): `(samples, seqlen)`.

    The dataset `random` (for benchmarks and tests, not listed in the help) is uniform token ids
    below `vocab_size` (the model's; the tokenizer's length when not given), drawn with `seed`.
    """
    if samples < 1 or seqlen < 2:
        raise LiteError(f"need --calib-samples >= 1 and --calib-seqlen >= 2, got {samples} and {seqlen}")
    if dataset == RANDOM:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size or len(tokenizer), (samples, seqlen), generator=g)
    ids = tokenize(tokenizer, load_text(dataset))
    bos = tokenizer.bos_token_id
    body = seqlen - (bos is not None)
    available = ids.numel() // body
    if available < samples:
        raise LiteError(
            f"calibration text {dataset!r} has {ids.numel()} tokens, fewer than --calib-samples × "
            f"--calib-seqlen = {samples} × {seqlen}; lower them or use a longer text"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=g)[:samples].sort().values
    windows = ids[: available * body].view(available, body)[chosen]  # (samples, body)
    if bos is not None:
        windows = torch.cat([torch.full((samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def readback_tokens(tokenizer) -> torch.Tensor:
    """Two windows of 128 tokens of the text shipped with lite `(2, 128)`: the read-back check's input when
    an export has no calibration windows."""
    return calibration_tokens(tokenizer, "sample", 2, 128, 0)


def readback_batches(tokenizer, tokens: torch.Tensor | None) -> list[torch.Tensor]:
    """Two batches of one window (at most 128 tokens) for the read-back check of a model in memory:
    calibration windows when there are any, else windows of the text shipped with lite."""
    if tokens is None:
        tokens = readback_tokens(tokenizer)
    return [window[None, :128] for window in tokens[:2]]
