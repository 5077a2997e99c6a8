"""Perplexity of checkpoints as transformers loads them (`AutoModelForCausalLM.from_pretrained`, which
for compressed-tensors folders needs the `compressed-tensors` package), on the same windows and with
the same scoring as `lite eval`, so the two can be compared row by row: perplexity, and the KL divergence
from the first model's next-token distribution (10^-3 nats per token) with the top-1 agreement.

    python scripts/eval_transformers.py FLOAT_MODEL CT_FOLDER [...] --dataset valid.txt --seqlen 512
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lite.data import load_text
from lite.eval import eval_windows, score


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--dataset", required=True)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out")
    args = p.parse_args()
    text = load_text(args.dataset, eval_split=True)
    rows, reference, windows = [], None, None
    for source in args.models:
        model = AutoModelForCausalLM.from_pretrained(source).eval().to(args.device)
        if windows is None:  # the first model's tokenization, for every model
            windows, _ = eval_windows(AutoTokenizer.from_pretrained(source), text, args.seqlen, args.samples)
        result = score(model, windows, args.batch_size, args.device, reference, progress=False)
        if reference is None:
            reference, result = model, {**result, "kl": 0.0, "top1_agreement": 1.0}
        rows.append({"model": source, "loader": "transformers", **result})
        ppl = result["perplexity"]
        print(f"{source}  perplexity {ppl:.4f} ({100 * (ppl / rows[0]['perplexity'] - 1):+.3f}% vs first)  "
              f"KL {1e3 * result['kl']:.3f}  top-1 {100 * result['top1_agreement']:.2f}%", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
