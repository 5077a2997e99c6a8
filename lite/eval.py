"""Perplexity and fidelity of float and quantized models on a text.

The text is tokenized whole (by the first model's tokenizer) and cut into non-overlapping windows of
`seqlen - 1` tokens; each is fed as BOS + window and every window token is scored (the first one from
BOS alone). Without a BOS token, windows have `seqlen` tokens and the first is not scored.

Fidelity compares each model's next-token distribution Q with the first model's P (the float one) on
the same windows: the mean KL divergence KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) in nats per
scored token, and the top-1 agreement (how often argmax Q = argmax P). Unlike perplexity, KL cannot
improve when a quantization error flattens the predictions: on a model as small as stories260K a
flatter Q can lower perplexity while moving away from P.
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
def score(model, windows: torch.Tensor, batch_size: int = 8, device: str = "cpu", reference=None,
          progress: bool = True) -> dict:
    """`{"perplexity"}` of `model` over every scored token of `windows`, and with a `reference` model
    also `{"kl", "top1_agreement"}` of `model`'s next-token distribution against the reference's.

    Log-probabilities are taken in float64, one window at a time (`(seqlen - 1, vocab)`): the KL of a
    good int8 model is around 1e-3 nats and of a near-identical one 1e-6, where fp32 rounding of two
    log-softmaxes would be noise."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for batch in tqdm(windows.split(batch_size), desc="evaluate", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # (b, s-1, vocab)
        ref_logits = None if reference is None else reference(input_ids=batch, use_cache=False).logits[:, :-1]
        for row in range(len(batch)):
            logq = F.log_softmax(logits[row].double(), dim=-1)  # (s-1, vocab)
            nll -= logq.gather(-1, batch[row, 1:, None]).sum().item()
            if ref_logits is not None:
                logp = F.log_softmax(ref_logits[row].double(), dim=-1)
                kl += (logp.exp() * (logp - logq)).sum().item()
                agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
        count += batch[:, 1:].numel()
    result = {"perplexity": math.exp(nll / count)}
    if reference is not None:
        result.update(kl=kl / count, top1_agreement=agree / count)
    return result


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, device: str = "cpu", progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over every scored token of `windows`."""
    return score(model, windows, batch_size, device, progress=progress)["perplexity"]


def load_for_eval(source: str):
    """(model, tokenizer) for a float model or a checkpoint lite wrote (lmdeploy or compressed-tensors)."""
    from lite.export import quant_method_of
    from lite.formats import READERS, load_checkpoint
    from lite.model import load_model

    if quant_method_of(source) in READERS:
        from transformers import AutoTokenizer

        return load_checkpoint(source), AutoTokenizer.from_pretrained(source)
    loaded = load_model(source)
    return loaded.model, loaded.tokenizer


def evaluate(models: list[str], dataset: str, seqlen: int, max_windows: int | None, batch_size: int,
             device: str | None, json_out: str | None) -> list[dict]:
    """Perplexity of each model on `dataset`, and the KL divergence and top-1 agreement of each next-token
    distribution with the first model's; prints a table relative to the first model.

    The first model stays loaded (on `device`) while the others are scored against it, one at a time.
    """
    import json
    import os

    from lite.data import load_text
    from lite.formats import describe

    if not models:
        raise LiteError("name at least one model: lite eval MODEL [MODEL ...]")
    if max_windows is not None and max_windows < 1:
        raise LiteError(f"--max-windows must be a positive integer, got {max_windows}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = load_text(dataset, eval_split=True)
    rows, reference, windows = [], None, None
    for source in models:
        model, tokenizer = load_for_eval(source)
        model = model.to(device)
        if windows is None:  # the first model's tokenization, for every model: the same inputs
            windows, _ = eval_windows(tokenizer, text, seqlen, max_windows)
        result = score(model, windows, batch_size, device, reference)
        if reference is None:
            reference, result = model, {**result, "kl": 0.0, "top1_agreement": 1.0}
        rows.append({"model": str(source), "quantization": describe(getattr(model.config, "quantization_config", None)),
                     **result, "windows": windows.shape[0], "seqlen": seqlen, "dataset": dataset})
        del model
    base = rows[0]["perplexity"]
    for row in rows:
        row["relative_change_pct"] = 100.0 * (row["perplexity"] / base - 1.0)
    width = max(len(r["model"]) for r in rows)
    qwidth = max(12, *(len(r["quantization"]) for r in rows))
    print(f"{'model':<{width}}  {'quantization':<{qwidth}} {'perplexity':>11} {'change':>9} "
          f"{'KL (1e-3 nats/token)':>21} {'top-1 agree':>11}")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['quantization']:<{qwidth}} {r['perplexity']:>11.4f} "
              f"{r['relative_change_pct']:>+8.3f}% {1e3 * r['kl']:>21.3f} {100 * r['top1_agreement']:>10.2f}%")
    if json_out:
        tmp = f"{json_out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, json_out)
    return rows
