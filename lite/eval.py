"""Perplexity of float and quantized models on a text.

The text is tokenized whole and cut into non-overlapping windows of `seqlen - 1` tokens; each is fed
as BOS + window and every window token is scored (the first one from BOS alone). Without a BOS
token, windows have `seqlen` tokens and the first is not scored.
"""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lite.data import tokenize
from lite.errors import LiteError


def eval_windows(tokenizer, text: str, seqlen: int, samples: int | None = None) -> tuple[torch.Tensor, bool]:
    """`(windows, seqlen)` token ids ready to feed, and whether position 0 is an added BOS."""
    ids = tokenize(tokenizer, text)
    bos = tokenizer.bos_token_id
    body = seqlen - (bos is not None)
    n = ids.numel() // body
    if samples is not None:
        n = min(n, samples)
    if n < 1:
        raise LiteError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {body}; lower --seqlen")
    windows = ids[: n * body].view(n, body)  # (n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows, bos is not None


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, device: str = "cpu", progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over every scored token of `windows`."""
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (b, seqlen, vocab)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def load_for_eval(source: str):
    """(model, tokenizer) for a float model or a checkpoint lite wrote (lmdeploy or compressed-tensors)."""
    from lite.formats import READERS, load_checkpoint, quant_method_of
    from lite.model import load_model

    if quant_method_of(source) in READERS:
        from transformers import AutoTokenizer

        return load_checkpoint(source), AutoTokenizer.from_pretrained(source)
    loaded = load_model(source)
    return loaded.model, loaded.tokenizer


def evaluate(models: list[str], dataset: str, seqlen: int, samples: int | None, batch_size: int,
             device: str | None, json_out: str | None) -> list[dict]:
    """Perplexity of each model on `dataset`; prints a table relative to the first model."""
    import json
    import os

    import torch

    from lite.data import load_text
    from lite.formats import describe

    if not models:
        raise LiteError("name at least one model: lite eval MODEL [MODEL ...]")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = load_text(dataset, eval_split=True)
    rows = []
    for source in models:
        model, tokenizer = load_for_eval(source)
        windows, _ = eval_windows(tokenizer, text, seqlen, samples)
        ppl = perplexity(model.to(device), windows, batch_size, device)
        rows.append({"model": str(source), "quantization": describe(getattr(model.config, "quantization_config", None)),
                     "perplexity": ppl,
                     "windows": windows.shape[0], "seqlen": seqlen, "dataset": dataset})
        del model
    base = rows[0]["perplexity"]
    for row in rows:
        row["relative_change_pct"] = 100.0 * (row["perplexity"] / base - 1.0)
    width = max(len(r["model"]) for r in rows)
    qwidth = max(12, *(len(r["quantization"]) for r in rows))
    print(f"{'model':<{width}}  {'quantization':<{qwidth}} {'perplexity':>11} {'change':>9}")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['quantization']:<{qwidth}} {r['perplexity']:>11.4f} "
              f"{r['relative_change_pct']:>+8.3f}%")
    if json_out:
        tmp = f"{json_out}.tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, json_out)
    return rows
